//! End-to-end tests of upstream key pools: selection strategies, cooldowns after 429s, dead keys
//! after 401s, concurrency caps, model allow-lists, and the `/admin/keys` API. llm-edge runs
//! in-process in front of a recording mock upstream that answers by the key it was sent.

mod common;

use bytes::Bytes;
use common::harness::Proxy;
use common::logs::capture_logs;
use common::mock::{Mock, Recorded, Reply, StreamEnd};
use common::{assert_error, client, within};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// A pool key as the tests configure it: its id, the variable holding it, the secret itself.
struct TestKey {
    id: &'static str,
    env: &'static str,
    secret: &'static str,
}

/// Every secret used in this file: distinctive enough to grep for in admin output and logs.
const KEYS: [TestKey; 4] = [
    TestKey {
        id: "a",
        env: "KP_KEY_A",
        secret: "sk-kp-alpha-5f0c2d9e41b7-Qa1x",
    },
    TestKey {
        id: "b",
        env: "KP_KEY_B",
        secret: "sk-kp-bravo-8e3a7c1f62d0-Rb2y",
    },
    TestKey {
        id: "c",
        env: "KP_KEY_C",
        secret: "sk-kp-charlie-2b9d4f6a0c13-Sc3z",
    },
    TestKey {
        id: "d",
        env: "KP_KEY_D",
        secret: "sk-kp-delta-7a1e5b3c9d24-Td4w",
    },
];

fn test_key(id: &str) -> &'static TestKey {
    KEYS.iter()
        .find(|k| k.id == id)
        .unwrap_or_else(|| panic!("no test key {id:?}"))
}

/// The environment the proxy resolves `os.environ/KP_KEY_*` from.
fn key_env() -> Vec<(&'static str, &'static str)> {
    KEYS.iter().map(|k| (k.env, k.secret)).collect()
}

/// The masked form llm-edge shows for a test key: first three characters, `…`, last four.
fn masked(id: &str) -> String {
    let s = test_key(id).secret;
    format!("{}…{}", &s[..3], &s[s.len() - 4..])
}

/// Which pool key a request carried (by its `Authorization: Bearer` header).
fn key_of(r: &Recorded) -> &'static str {
    let auth = r.header_all("authorization");
    assert_eq!(auth.len(), 1, "exactly one Authorization header upstream");
    KEYS.iter()
        .find(|k| auth[0] == format!("Bearer {}", k.secret))
        .map(|k| k.id)
        .unwrap_or_else(|| panic!("the upstream got an unknown credential: {:?}", auth[0]))
}

/// The keys of every request the mock received, in arrival order.
fn keys_seen(mock: &Mock) -> Vec<&'static str> {
    mock.requests().iter().map(key_of).collect()
}

fn counts(keys: &[&'static str]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(*k).or_insert(0) += 1;
    }
    m
}

/// `{id: a, key: os.environ/KP_KEY_A, <extra>}`.
fn key_entry(id: &str, extra: &str) -> String {
    let env = test_key(id).env;
    if extra.is_empty() {
        format!("{{id: {id}, key: os.environ/{env}}}")
    } else {
        format!("{{id: {id}, key: os.environ/{env}, {extra}}}")
    }
}

/// A flow list of plain key entries.
fn keys_yaml(ids: &[&str]) -> String {
    let entries: Vec<String> = ids.iter().map(|id| key_entry(id, "")).collect();
    format!("[{}]", entries.join(", "))
}

/// One OpenAI-kind upstream `u` at `url` with `keys`; `extra` holds more upstream fields, each
/// line indented by four spaces. Models `m`, `a` and `b` are all served by `u`.
fn config(url: &str, keys: &str, extra: &str) -> String {
    format!(
        r#"
upstreams:
  u:
    kind: openai
    endpoints: ["{url}"]
    keys: {keys}
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
{extra}
models:
  - {{name: m, upstream: u}}
  - {{name: a, upstream: u}}
  - {{name: b, upstream: u}}
"#
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn chat_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// The mock's normal answer: 200 JSON naming the key that was used (also in `x-mock-key`).
fn ok_reply(r: &Recorded) -> Reply {
    let id = key_of(r);
    Reply::json(200, format!(r#"{{"id":"chatcmpl-1","key":"{id}"}}"#)).header("x-mock-key", id)
}

/// An upstream 429 with `Retry-After: secs` and an OpenAI-style body naming the key.
fn rate_limited_reply(id: &str, secs: u64) -> Reply {
    Reply::json(
        429,
        format!(
            r#"{{"error":{{"message":"Rate limit reached for requests on key {id}","type":"requests","code":"rate_limit_exceeded"}}}}"#
        ),
    )
    .header("retry-after", &secs.to_string())
    .header("x-mock-key", id)
}

/// An upstream 401 as OpenAI sends it for a revoked key.
fn unauthorized_reply(id: &str) -> Reply {
    Reply::json(
        401,
        r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","code":"invalid_api_key"}}"#,
    )
    .header("x-mock-key", id)
}

/// A running proxy with one HTTP client that keeps its connections.
struct Edge {
    proxy: Proxy,
    http: reqwest::Client,
}

impl Edge {
    fn start(yaml: &str) -> Self {
        capture_logs();
        Self {
            proxy: Proxy::start_with_env(yaml, &key_env()),
            http: client(),
        }
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.post_with(path, body, &[]).await
    }

    async fn post_with(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.proxy.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        within(
            Duration::from_secs(10),
            "a request through the proxy",
            async { req.send().await.expect("request through the proxy") },
        )
        .await
    }

    async fn chat(&self, model: &str) -> reqwest::Response {
        self.post(CHAT, chat_body(model)).await
    }

    /// Sends a chat call that must succeed; returns the key the mock says answered it.
    async fn chat_ok(&self, path: &str, model: &str) -> String {
        let resp = self.post(path, chat_body(model)).await;
        assert_ok(resp).await
    }

    /// `GET /admin/keys` (must be 200): headers and body as text (for secret greps), and the body
    /// parsed.
    async fn admin_keys(&self) -> (String, serde_json::Value) {
        let resp = self
            .http
            .get(self.proxy.admin_url("/admin/keys"))
            .send()
            .await
            .expect("GET /admin/keys");
        assert_eq!(resp.status(), 200, "GET /admin/keys");
        let (text, body) = read_all(resp).await;
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/admin/keys is not JSON ({e}): {body}"));
        (text, v)
    }

    /// `POST /admin/keys/{upstream}/{id}/reset`: status and full text (headers and body).
    async fn reset(&self, upstream: &str, id: &str) -> (u16, String) {
        let resp = self
            .http
            .post(
                self.proxy
                    .admin_url(&format!("/admin/keys/{upstream}/{id}/reset")),
            )
            .send()
            .await
            .expect("POST reset");
        let status = resp.status().as_u16();
        (status, read_all(resp).await.0)
    }
}

/// A response read whole: its headers and body as one text (for secret greps), and the body.
async fn read_all(resp: reqwest::Response) -> (String, String) {
    let mut text = String::new();
    for (k, v) in resp.headers() {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let body = resp.bytes().await.expect("response body");
    let body = String::from_utf8_lossy(&body).into_owned();
    text.push('\n');
    text.push_str(&body);
    (text, body)
}

/// Asserts a 200 from the mock and returns the key it reported.
async fn assert_ok(resp: reqwest::Response) -> String {
    let status = resp.status().as_u16();
    let key = resp
        .headers()
        .get("x-mock-key")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.bytes().await.expect("response body");
    assert_eq!(
        status,
        200,
        "status; body: {}",
        String::from_utf8_lossy(&body)
    );
    let key = key.expect("x-mock-key on a mock answer");
    assert_eq!(
        body,
        Bytes::from(format!(r#"{{"id":"chatcmpl-1","key":"{key}"}}"#)),
        "the mock's body, unchanged"
    );
    key
}

/// The `/admin/keys` entry of key `id` of upstream `u`.
fn admin_key<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    admin_key_in(v, "u", id)
}

/// The `/admin/keys` entry of key `id` of `upstream`.
fn admin_key_in<'a>(v: &'a serde_json::Value, upstream: &str, id: &str) -> &'a serde_json::Value {
    admin_keys_of(v, upstream)
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("key {id} of {upstream} in /admin/keys: {v}"))
}

/// The `/admin/keys` key list of `upstream`.
fn admin_keys_of<'a>(v: &'a serde_json::Value, upstream: &str) -> &'a Vec<serde_json::Value> {
    v["data"]
        .as_array()
        .expect("data is a list")
        .iter()
        .find(|u| u["upstream"] == upstream)
        .unwrap_or_else(|| panic!("upstream {upstream} in /admin/keys: {v}"))["keys"]
        .as_array()
        .expect("keys is a list")
}

/// Asserts that no raw secret of [`KEYS`], nor the hidden middle part of one, occurs in `text`.
fn assert_no_secret(what: &str, text: &str) {
    for k in &KEYS {
        let hidden = &k.secret[3..k.secret.len() - 4];
        assert!(
            !text.contains(k.secret) && !text.contains(hidden),
            "{what} leaks the secret of key {}:\n{text}",
            k.id
        );
    }
}

/// The highest number of requests any one key had in flight at the mock at once, by key: each
/// request counts from when the mock had read it until its streamed reply ended. Requests are
/// matched to their streams by their unique path and query.
fn peak_in_flight_by_key(mock: &Mock) -> BTreeMap<&'static str, i32> {
    let ends: HashMap<String, Instant> = mock
        .streams()
        .iter()
        .map(|s| {
            let (at, how) = s.end().expect("every stream ended");
            assert_eq!(how, StreamEnd::Completed, "stream {} completed", s.uri);
            // The last chunk's emission is the latest moment the upstream still held the
            // request: the mock's own end-of-stream record can come after the proxy already
            // had every byte, released the key and sent the next request.
            (s.uri.clone(), s.emitted().last().copied().unwrap_or(at))
        })
        .collect();
    let mut events: BTreeMap<&'static str, Vec<(Instant, i32)>> = BTreeMap::new();
    for r in mock.requests() {
        let end = *ends
            .get(&r.uri)
            .unwrap_or_else(|| panic!("no stream for {}", r.uri));
        let ev = events.entry(key_of(&r)).or_default();
        ev.push((r.at, 1));
        ev.push((end, -1));
    }
    events
        .into_iter()
        .map(|(k, mut ev)| {
            // At equal instants the end counts first: it happened before the next request.
            ev.sort();
            let (mut now, mut peak) = (0, 0);
            for (_, d) in ev {
                now += d;
                peak = peak.max(now);
            }
            (k, peak)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_spreads_300_requests_exactly_evenly_over_three_keys() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b", "c"]), ""));

    let sent = futures::future::join_all((0..10).map(|_| async {
        for _ in 0..30 {
            // The client's own credential must not reach the upstream.
            let resp = edge
                .post_with(
                    CHAT,
                    chat_body("m"),
                    &[("authorization", "Bearer client-token-not-for-upstream")],
                )
                .await;
            assert_ok(resp).await;
        }
    }));
    within(Duration::from_secs(20), "300 requests", sent).await;

    let seen = keys_seen(&mock);
    assert_eq!(seen.len(), 300, "one upstream request per call");
    assert_eq!(
        counts(&seen),
        BTreeMap::from([("a", 100), ("b", 100), ("c", 100)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_in_cooldown_is_skipped_until_retry_after() {
    // Key a answers its first request with 429 and `Retry-After: 2`, then recovers.
    let a_limited = AtomicBool::new(true);
    let mock = Mock::start(move |r| {
        if key_of(r) == "a" && a_limited.swap(false, Ordering::SeqCst) {
            rate_limited_reply("a", 2)
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    // Round robin starts with a: its 429 is retried on b before the client sees anything.
    assert_eq!(edge.chat_ok(CHAT, "m").await, "b");
    assert_eq!(keys_seen(&mock), ["a", "b"]);
    let limited_at = mock.requests()[0].at;

    // Inside the window every request goes to b.
    let mut during = 0;
    while limited_at.elapsed() < ms(1700) {
        assert_eq!(edge.chat_ok(CHAT, "m").await, "b");
        during += 1;
        tokio::time::sleep(ms(20)).await;
    }
    assert!(during >= 10, "only {during} requests during the cooldown");
    let seen = keys_seen(&mock);
    assert_eq!(
        seen.iter().filter(|k| **k == "a").count(),
        1,
        "key a got nothing while cooling down: {seen:?}"
    );

    // After the window a is used again (and answers).
    within(Duration::from_secs(3), "key a back in rotation", async {
        while edge.chat_ok(CHAT, "m").await != "a" {
            tokio::time::sleep(ms(20)).await;
        }
    })
    .await;
    let a_again = mock
        .requests()
        .iter()
        .filter(|r| key_of(r) == "a")
        .nth(1)
        .map(|r| r.at)
        .expect("a second request on key a");
    let rested = a_again.duration_since(limited_at);
    assert!(
        rested >= ms(1950) && rested < ms(3500),
        "key a rested {rested:?}, Retry-After was 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_key_is_dead_until_admin_reset() {
    // Key a is refused until the test "rotates" it at the provider.
    let a_revoked = Arc::new(AtomicBool::new(true));
    let revoked = a_revoked.clone();
    let mock = Mock::start(move |r| {
        if key_of(r) == "a" && revoked.load(Ordering::SeqCst) {
            unauthorized_reply("a")
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    assert_eq!(
        edge.chat_ok(CHAT, "m").await,
        "b",
        "the 401 is retried on b"
    );
    for _ in 0..10 {
        assert_eq!(edge.chat_ok(CHAT, "m").await, "b");
    }
    let seen = keys_seen(&mock);
    assert_eq!(counts(&seen)[&"a"], 1, "a is never used again: {seen:?}");

    let (text, v) = edge.admin_keys().await;
    assert_no_secret("GET /admin/keys", &text);
    assert_eq!(v["object"], "list", "{v}");
    let up = &v["data"][0];
    assert_eq!(up["upstream"], "u", "{v}");
    assert_eq!(up["kind"], "openai", "{v}");
    assert_eq!(up["strategy"], "round_robin", "{v}");
    let a = admin_key(&v, "a");
    assert_eq!(a["state"], "dead", "{v}");
    assert_eq!(a["masked"], masked("a"), "{v}");
    assert_eq!(a["last_error"], "unauthorized", "{v}");
    assert_eq!(a["in_flight"], 0, "{v}");
    let b = admin_key(&v, "b");
    assert_eq!(b["state"], "up", "{v}");
    assert_eq!(b["masked"], masked("b"), "{v}");
    assert_eq!(b["cooldown_remaining_ms"], 0, "{v}");

    a_revoked.store(false, Ordering::SeqCst);
    let (status, text) = edge.reset("u", "a").await;
    assert_eq!(status, 200, "reset: {text}");
    assert_no_secret("POST reset", &text);
    let (_, v) = edge.admin_keys().await;
    assert_eq!(admin_key(&v, "a")["state"], "up", "{v}");
    assert_eq!(admin_key(&v, "a")["last_error"], serde_json::Value::Null);

    let before = mock.requests().len();
    let mut used = Vec::new();
    for _ in 0..4 {
        used.push(edge.chat_ok(CHAT, "m").await);
    }
    assert!(used.iter().any(|k| k == "a"), "a is used again: {used:?}");
    let after: Vec<&str> = keys_seen(&mock)[before..].to_vec();
    assert_eq!(counts(&after), BTreeMap::from([("a", 2), ("b", 2)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_keys_rate_limited_passes_the_429_through_then_answers_it_locally() {
    let mock = Mock::start(|r| match key_of(r) {
        "a" => rate_limited_reply("a", 7),
        id => rate_limited_reply(id, 5),
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    // First call: a then b answer 429; b's answer (the last) reaches the client unchanged.
    let resp = edge.chat("m").await;
    assert_eq!(resp.status(), 429);
    let h = resp.headers().clone();
    let body = resp.bytes().await.unwrap();
    assert_eq!(keys_seen(&mock), ["a", "b"], "each key tried once");
    let upstream = mock.requests()[1].clone();
    assert_eq!(key_of(&upstream), "b");
    assert_eq!(
        body,
        Bytes::from(
            r#"{"error":{"message":"Rate limit reached for requests on key b","type":"requests","code":"rate_limit_exceeded"}}"#
        ),
        "the upstream's body, unchanged"
    );
    assert_eq!(h.get("retry-after").unwrap(), "5");
    assert_eq!(h.get("x-mock-key").unwrap(), "b");
    assert_eq!(h.get("content-type").unwrap(), "application/json");

    // Second call: nothing goes upstream; llm-edge answers with the earliest recovery.
    let resp = edge.chat("m").await;
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .expect("Retry-After on llm-edge's 429")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert_error(resp, 429, "upstream_rate_limited").await;
    assert!(
        (1..=5).contains(&retry_after),
        "Retry-After {retry_after} is the earliest recovery (b: 5 s)"
    );
    assert_eq!(mock.requests().len(), 2, "the mock saw no new request");

    let (text, v) = edge.admin_keys().await;
    assert_no_secret("GET /admin/keys", &text);
    for (id, hint) in [("a", 7000), ("b", 5000)] {
        let k = admin_key(&v, id);
        assert_eq!(k["state"], "cooling", "{v}");
        assert_eq!(k["last_error"], "rate_limited", "{v}");
        let left = k["cooldown_remaining_ms"].as_u64().expect("a number");
        assert!(left > 0 && left <= hint, "key {id}: {left} ms left: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_keys_refused_is_502_credentials_exhausted() {
    let mock = Mock::start(|r| unauthorized_reply(key_of(r)));
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    let resp = edge.chat("m").await;
    assert_error(resp, 502, "upstream_credentials_exhausted").await;
    assert_eq!(keys_seen(&mock), ["a", "b"], "each key tried once");

    // Both keys are dead now: the next call does not reach the upstream.
    let resp = edge.chat("m").await;
    assert_error(resp, 502, "upstream_credentials_exhausted").await;
    assert_eq!(mock.requests().len(), 2, "the mock saw no new request");

    let (text, v) = edge.admin_keys().await;
    assert_no_secret("GET /admin/keys", &text);
    assert_eq!(admin_key(&v, "a")["state"], "dead", "{v}");
    assert_eq!(admin_key(&v, "b")["state"], "dead", "{v}");
}

/// An SSE chat stream: one event now, the rest `hold` later.
fn slow_stream(hold: Duration) -> Reply {
    Reply::sse(vec![
        (
            ms(0),
            Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
            ),
        ),
        (
            hold,
            Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n",
            ),
        ),
        (ms(0), Bytes::from_static(b"data: [DONE]\n\n")),
    ])
}

const SLOW_STREAM_BODY: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n";

fn stream_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_busy_sends_new_requests_to_the_idle_key() {
    let mock = Mock::start(|r| {
        if r.body_str().contains("\"stream\":true") {
            slow_stream(ms(1200)).header("x-mock-key", key_of(r))
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(
        &mock.url(),
        &keys_yaml(&["a", "b"]),
        "    key_strategy: least_busy",
    ));

    let slow = edge.post(CHAT, stream_body("m")).await;
    assert_eq!(slow.status(), 200);
    let busy = key_of(&mock.only_request());
    let idle = if busy == "a" { "b" } else { "a" };

    let (_, v) = edge.admin_keys().await;
    assert_eq!(admin_key(&v, busy)["in_flight"], 1, "{v}");
    assert_eq!(admin_key(&v, idle)["in_flight"], 0, "{v}");
    assert_eq!(v["data"][0]["strategy"], "least_busy", "{v}");

    for _ in 0..10 {
        assert_eq!(edge.chat_ok(CHAT, "m").await, idle);
    }
    assert!(
        mock.streams()[0].end().is_none(),
        "the slow stream was still open while the others were sent"
    );

    let body = within(Duration::from_secs(5), "the slow stream", slow.bytes())
        .await
        .unwrap();
    assert_eq!(body, SLOW_STREAM_BODY.as_bytes());
    within(Duration::from_secs(2), "the slot released", async {
        while admin_key(&edge.admin_keys().await.1, busy)["in_flight"] != 0 {
            tokio::time::sleep(ms(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_concurrent_is_never_exceeded_and_waiting_requests_get_a_slot() {
    let mock = Mock::start(|r| {
        Reply::sse(vec![
            (ms(0), Bytes::from_static(b"data: {\"n\":1}\n\n")),
            (ms(60), Bytes::from_static(b"data: {\"n\":2}\n\n")),
            (ms(60), Bytes::from_static(b"data: [DONE]\n\n")),
        ])
        .header("x-mock-key", key_of(r))
    });
    let keys = format!(
        "[{}, {}]",
        key_entry("a", "max_concurrent: 2"),
        key_entry("b", "max_concurrent: 2")
    );
    let edge = Edge::start(&config(
        &mock.url(),
        &keys,
        "    key_strategy: least_busy\n    retries: {deadline: 20s}",
    ));

    let started = Instant::now();
    let calls = futures::future::join_all((0..50).map(|i| {
        let edge = &edge;
        async move {
            let resp = edge.post(&format!("{CHAT}?n={i}"), stream_body("m")).await;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.expect("stream body");
            (status, body)
        }
    }));
    let results = within(Duration::from_secs(25), "50 capped requests", calls).await;
    let took = started.elapsed();

    for (i, (status, body)) in results.iter().enumerate() {
        assert_eq!(
            *status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            body,
            &Bytes::from_static(b"data: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: [DONE]\n\n"),
            "request {i}"
        );
    }
    assert_eq!(mock.requests().len(), 50, "each request went upstream once");
    let peaks = peak_in_flight_by_key(&mock);
    assert_eq!(
        peaks,
        BTreeMap::from([("a", 2), ("b", 2)]),
        "peak requests in flight per key at the upstream (took {took:?})"
    );
    // A lease is released just after the last byte went out: allow the proxy a moment.
    let mut v = edge.admin_keys().await.1;
    for _ in 0..100 {
        if ["a", "b"]
            .iter()
            .all(|id| admin_key(&v, id)["in_flight"] == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        v = edge.admin_keys().await.1;
    }
    for id in ["a", "b"] {
        assert_eq!(admin_key(&v, id)["in_flight"], 0, "{v}");
        assert_eq!(admin_key(&v, id)["max_concurrent"], 2, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_sticks_to_one_key_until_it_is_rate_limited() {
    let limited: Arc<Mutex<BTreeSet<&'static str>>> = Arc::default();
    let script = limited.clone();
    let mock = Mock::start(move |r| {
        let id = key_of(r);
        if script.lock().unwrap().contains(id) {
            rate_limited_reply(id, 30)
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(
        &mock.url(),
        &keys_yaml(&["a", "b", "c"]),
        "    key_strategy: sequential",
    ));

    for _ in 0..10 {
        assert_eq!(edge.chat_ok(CHAT, "m").await, "a");
    }
    limited.lock().unwrap().insert("a");
    for _ in 0..10 {
        assert_eq!(edge.chat_ok(CHAT, "m").await, "b");
    }
    limited.lock().unwrap().insert("b");
    for _ in 0..5 {
        assert_eq!(edge.chat_ok(CHAT, "m").await, "c");
    }

    let mut expected = vec!["a"; 11];
    expected.extend(["b"; 11]);
    expected.extend(["c"; 5]);
    assert_eq!(
        keys_seen(&mock),
        expected,
        "one 429 per key, then the next key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_strategy_keeps_an_rllm_session_on_one_key() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &keys_yaml(&["a", "b", "c", "d"]),
        "    key_strategy: session",
    ));

    let s1 = "/sessions/s1/v1/chat/completions";
    let first = edge.chat_ok(s1, "m").await;
    for _ in 0..19 {
        assert_eq!(
            edge.chat_ok(s1, "m").await,
            first,
            "session s1 keeps its key"
        );
    }
    assert!(
        mock.requests().iter().all(|r| r.uri == CHAT),
        "the session prefix is stripped"
    );

    // The slug form pins on its session_name too.
    let slug = "/meta/rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9/v1/chat/completions";
    let pinned = edge.chat_ok(slug, "m").await;
    for _ in 0..9 {
        assert_eq!(
            edge.chat_ok(slug, "m").await,
            pinned,
            "sess_123 keeps its key"
        );
    }

    // Different sessions spread over the keys, each still sticky.
    let mut by_session = BTreeMap::new();
    for i in 0..20 {
        let path = format!("/sessions/spread-{i}/v1/chat/completions");
        let k = edge.chat_ok(&path, "m").await;
        assert_eq!(edge.chat_ok(&path, "m").await, k, "session spread-{i}");
        by_session.insert(i, k);
    }
    let distinct: BTreeSet<&String> = by_session.values().collect();
    assert!(
        distinct.len() >= 3,
        "20 sessions use at least 3 of 4 keys: {by_session:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_header_pins_the_key() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &keys_yaml(&["a", "b", "c", "d"]),
        "    key_strategy: session\n    session_header: x-session-id",
    ));

    let mut by_session = BTreeMap::new();
    for i in 0..12 {
        let sid = format!("conv-{i}");
        let mut keys = BTreeSet::new();
        for _ in 0..5 {
            let resp = edge
                .post_with(CHAT, chat_body("m"), &[("x-session-id", &sid)])
                .await;
            keys.insert(assert_ok(resp).await);
        }
        assert_eq!(keys.len(), 1, "session {sid} used {keys:?}");
        by_session.insert(sid, keys.into_iter().next().unwrap());
    }
    let distinct: BTreeSet<&String> = by_session.values().collect();
    assert!(distinct.len() >= 2, "sessions spread: {by_session:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_mib_request_retried_after_429_arrives_byte_identical() {
    let mock = Mock::start(|r| match key_of(r) {
        "a" => rate_limited_reply("a", 30),
        _ => ok_reply(r),
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));
    let filler = common::letters(1 << 20);
    let sent = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{filler} \\u00e9 \u{2713}\"}}]}}"
    );
    assert!(sent.len() > 1 << 20);

    let resp = edge.post(CHAT, sent.clone()).await;
    assert_eq!(assert_ok(resp).await, "b");

    let got = mock.requests();
    assert_eq!(got.len(), 2, "429 on a, then b");
    assert_eq!(key_of(&got[0]), "a");
    assert_eq!(key_of(&got[1]), "b");
    for r in &got {
        assert!(r.body == sent.as_bytes(), "key {}: body differs", key_of(r));
        assert_eq!(
            r.header("content-length"),
            Some(sent.len().to_string().as_str())
        );
    }
    assert!(
        got[0].body == got[1].body,
        "both attempts carry the same bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_400_is_not_retried_and_passes_through_unchanged() {
    let err = r#"{"error":{"message":"Invalid value for 'temperature'.","type":"invalid_request_error","param":"temperature","code":null}}"#;
    let mock = Mock::start(move |r| {
        Reply::json(400, err)
            .header("x-mock-key", key_of(r))
            .header("x-request-id", "req-400")
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    let resp = edge.chat("m").await;
    assert_eq!(resp.status(), 400);
    // The client gets llm-edge's request id; the provider's stays under another name.
    assert_eq!(
        resp.headers().get("x-upstream-request-id").unwrap(),
        "req-400"
    );
    assert!(resp
        .headers()
        .get("x-request-id")
        .is_some_and(|v| v.to_str().unwrap().starts_with("req_")));
    assert_eq!(resp.headers().get("x-mock-key").unwrap(), "a");
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    assert_eq!(resp.bytes().await.unwrap(), err.as_bytes());
    assert_eq!(keys_seen(&mock), ["a"], "exactly one upstream request");

    // A 400 says nothing about the key: it stays up.
    let (_, v) = edge.admin_keys().await;
    assert_eq!(admin_key(&v, "a")["state"], "up", "{v}");
    assert_eq!(admin_key(&v, "a")["cooldown_remaining_ms"], 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_with_model_allow_list_never_gets_other_models() {
    let mock = Mock::start(ok_reply);
    let keys = format!(
        "[{}, {}, {}]",
        key_entry("a", "models: [a]"),
        key_entry("b", ""),
        key_entry("c", "models: [b]"),
    );
    let edge = Edge::start(&config(&mock.url(), &keys, ""));

    for i in 0..40 {
        edge.chat_ok(CHAT, if i % 2 == 0 { "a" } else { "b" }).await;
    }

    let mut by_key: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for r in mock.requests() {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let model = v["model"].as_str().unwrap().to_string();
        *by_key
            .entry(key_of(&r))
            .or_default()
            .entry(model)
            .or_insert(0) += 1;
    }
    assert_eq!(mock.requests().len(), 40);
    let models = |id: &str| -> BTreeSet<String> {
        by_key
            .get(id)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(
        models("a"),
        BTreeSet::from(["a".to_string()]),
        "key a serves only model a: {by_key:?}"
    );
    assert_eq!(
        models("c"),
        BTreeSet::from(["b".to_string()]),
        "key c serves only model b: {by_key:?}"
    );
    assert!(models("b").len() == 2, "key b serves both: {by_key:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_admin_output_or_logs() {
    let logs = capture_logs();
    let mock = Mock::start(|r| match key_of(r) {
        "a" => unauthorized_reply("a"),
        "b" => rate_limited_reply("b", 30),
        _ => ok_reply(r),
    });
    // Upstream `bare` lists bare secrets: their ids are derived, never the secret.
    let yaml = config(&mock.url(), &keys_yaml(&["a", "b", "c", "d"]), "").replace(
        "\nmodels:\n",
        &format!(
            "  bare:\n    kind: openai\n    endpoints: [\"{}\"]\n    keys: [os.environ/KP_KEY_C, os.environ/KP_KEY_D]\nmodels:\n  - {{name: bm, upstream: bare}}\n",
            mock.url()
        ),
    );
    let edge = Edge::start(&yaml);

    for _ in 0..8 {
        edge.chat_ok(CHAT, "m").await;
    }
    let seen = counts(&keys_seen(&mock));
    assert_eq!(seen[&"a"], 1, "{seen:?}");
    assert_eq!(seen[&"b"], 1, "{seen:?}");
    for _ in 0..2 {
        edge.chat_ok(CHAT, "bm").await;
    }

    let mut outputs: Vec<(String, String)> = Vec::new();
    let (text, v) = edge.admin_keys().await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(admin_key(&v, id)["masked"], masked(id), "{v}");
    }
    let bare_keys = admin_keys_of(&v, "bare");
    assert_eq!(bare_keys.len(), 2, "{v}");
    for (k, id) in bare_keys.iter().zip(["c", "d"]) {
        assert!(
            k["id"].as_str().unwrap().starts_with("key-"),
            "a derived id: {v}"
        );
        assert_eq!(k["masked"], masked(id), "{v}");
    }
    assert_eq!(admin_key(&v, "a")["state"], "dead", "{v}");
    assert_eq!(admin_key(&v, "b")["state"], "cooling", "{v}");
    outputs.push(("GET /admin/keys".into(), text));
    for (up, id) in [("u", "a"), ("u", "b"), ("u", "nope"), ("nope", "a")] {
        let (status, text) = edge.reset(up, id).await;
        let ok = up == "u" && id != "nope";
        assert_eq!(
            status,
            if ok { 200 } else { 404 },
            "reset {up}/{id}: {text}"
        );
        outputs.push((format!("POST /admin/keys/{up}/{id}/reset"), text));
    }
    for path in [
        "/admin/keys/u",
        "/admin/keys/u/a",
        "/admin",
        "/admin/traces",
    ] {
        let resp = edge
            .http
            .get(edge.proxy.admin_url(path))
            .send()
            .await
            .unwrap();
        outputs.push((format!("GET {path}"), read_all(resp).await.0));
    }
    let (text, _) = edge.admin_keys().await;
    outputs.push(("GET /admin/keys after resets".into(), text));
    for (what, text) in &outputs {
        assert_no_secret(what, text);
    }

    // The log capture works (these lines come from the 429 and the 401 above)…
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(log.contains("key rate limited"), "log capture is empty");
    assert!(
        log.contains("upstream refused the key"),
        "the 401 is logged"
    );
    // …and holds no secret.
    assert_no_secret("the proxy's log output", &log);
}

/// Anthropic upstreams take the key in `x-api-key`, and the client's credential never reaches
/// the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_keys_are_sent_as_x_api_key() {
    let mock = Mock::start(|r| {
        let keys = r.header_all("x-api-key");
        assert_eq!(keys.len(), 1, "one x-api-key upstream");
        let id = KEYS
            .iter()
            .find(|k| k.secret == keys[0])
            .map(|k| k.id)
            .expect("a pool key");
        assert!(r.header("authorization").is_none(), "no Authorization");
        Reply::json(200, format!(r#"{{"id":"chatcmpl-1","key":"{id}"}}"#)).header("x-mock-key", id)
    });
    let yaml = format!(
        r#"
upstreams:
  claude:
    kind: anthropic
    endpoints: ["{}"]
    keys: {}
models:
  - {{name: claude-x, upstream: claude}}
"#,
        mock.url(),
        keys_yaml(&["a", "b"])
    );
    let edge = Edge::start(&yaml);
    let body = r#"{"model":"claude-x","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut used = Vec::new();
    for _ in 0..4 {
        let resp = edge
            .post_with(
                "/v1/messages",
                body,
                &[
                    ("x-api-key", "client-key-not-for-upstream"),
                    ("authorization", "Bearer client-token"),
                ],
            )
            .await;
        used.push(assert_ok(resp).await);
    }
    assert_eq!(used, ["a", "b", "a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cooldown_applies_to_the_rate_limited_model_only() {
    // Key a is rate limited for model a only.
    let mock = Mock::start(|r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if key_of(r) == "a" && v["model"] == "a" {
            rate_limited_reply("a", 30)
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    assert_eq!(edge.chat_ok(CHAT, "a").await, "b", "429 on a, retried on b");
    // Runs of one model each: the round-robin counter is shared by all models.
    let mut for_b = BTreeSet::new();
    for _ in 0..6 {
        for_b.insert(edge.chat_ok(CHAT, "b").await);
    }
    let mut for_a = BTreeSet::new();
    for _ in 0..6 {
        for_a.insert(edge.chat_ok(CHAT, "a").await);
    }
    assert_eq!(
        for_b,
        BTreeSet::from(["a".to_string(), "b".to_string()]),
        "model b still uses both keys"
    );
    assert_eq!(
        for_a,
        BTreeSet::from(["b".to_string()]),
        "model a avoids key a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_hints_set_the_cooldown_else_the_default_capped_by_max_cooldown() {
    // Upstream u: every key says when to come back, each in another way.
    let hinted = Mock::start(|r| {
        let id = key_of(r);
        let base = Reply::json(
            429,
            r#"{"error":{"message":"Rate limit reached. Please try again in 45.5s. Visit the docs.","type":"requests"}}"#,
        );
        match id {
            "a" => base.header(
                "retry-after",
                &httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(20)),
            ),
            "b" => base.header("retry-after-ms", "12500"),
            "c" => base
                .header("x-ratelimit-reset-requests", "1m30s")
                .header("x-ratelimit-reset-tokens", "6s"),
            _ => base,
        }
    });
    // Upstream v (max_cooldown 10s): a asks for an hour, b gives no hint at all.
    let capped = Mock::start(|r| match key_of(r) {
        "a" => Reply::json(429, "{}").header("retry-after", "3600"),
        _ => Reply::json(429, "{}"),
    });
    let yaml = format!(
        r#"
upstreams:
  u:
    kind: openai
    endpoints: ["{}"]
    keys: {}
    retries: {{max_attempts: 4}}
  v:
    kind: openai
    endpoints: ["{}"]
    keys: {}
    retries: {{max_cooldown: 10s}}
models:
  - {{name: m, upstream: u}}
  - {{name: n, upstream: v}}
"#,
        hinted.url(),
        keys_yaml(&["a", "b", "c", "d"]),
        capped.url(),
        keys_yaml(&["a", "b"]),
    );
    let edge = Edge::start(&yaml);

    let resp = edge.chat("m").await;
    assert_eq!(resp.status(), 429, "the last key's 429, passed through");
    let seen: BTreeSet<&str> = keys_seen(&hinted).into_iter().collect();
    assert_eq!(seen, BTreeSet::from(["a", "b", "c", "d"]), "each key once");
    assert_eq!(hinted.requests().len(), 4);
    let resp = edge.chat("n").await;
    assert_eq!(resp.status(), 429);
    let seen: BTreeSet<&str> = keys_seen(&capped).into_iter().collect();
    assert_eq!(seen, BTreeSet::from(["a", "b"]), "each key once");
    assert_eq!(capped.requests().len(), 2);

    let (_, v) = edge.admin_keys().await;
    let left = |up: &str, id: &str| -> u64 {
        let k = admin_key_in(&v, up, id);
        assert_eq!(k["state"], "cooling", "{up}/{id}: {v}");
        k["cooldown_remaining_ms"].as_u64().unwrap()
    };
    let expect = [
        ("u", "a", 18_000, 20_000, "Retry-After as an HTTP date"),
        ("u", "b", 11_500, 12_500, "retry-after-ms"),
        ("u", "c", 89_000, 90_000, "the longer x-ratelimit-reset-*"),
        (
            "u",
            "d",
            44_500,
            45_500,
            "\"try again in 45.5s\" in the body",
        ),
        (
            "v",
            "a",
            9_000,
            10_000,
            "Retry-After: 3600 capped by max_cooldown",
        ),
        (
            "v",
            "b",
            4_000,
            5_000,
            "no hint: the first default step, 5 s",
        ),
    ];
    for (up, id, lo, hi, why) in expect {
        let ms = left(up, id);
        assert!(
            ms > lo && ms <= hi,
            "{up}/{id} cools for {ms} ms, expected ({lo}, {hi}]: {why}"
        );
    }

    // Every key of u cools: llm-edge answers itself with the earliest recovery (b, 12.5 s).
    let resp = edge.chat("m").await;
    let retry_after = resp.headers()["retry-after"].to_str().unwrap().to_string();
    assert_error(resp, 429, "upstream_rate_limited").await;
    assert!(
        retry_after == "12" || retry_after == "13",
        "Retry-After {retry_after}, earliest recovery 12.5 s"
    );
    assert_eq!(hinted.requests().len(), 4, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_then_refused_passes_the_429_through() {
    // a is rate limited, b is refused: the only usable answer is a's 429 (a will recover);
    // "every key is refused" would be wrong.
    let mock = Mock::start(|r| match key_of(r) {
        "a" => rate_limited_reply("a", 5),
        id => unauthorized_reply(id),
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    let resp = edge.chat("m").await;
    assert_eq!(keys_seen(&mock), ["a", "b"]);
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        status,
        429,
        "a key is only cooling down, not refused; got {status} {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(
        body,
        Bytes::from(
            r#"{"error":{"message":"Rate limit reached for requests on key a","type":"requests","code":"rate_limit_exceeded"}}"#
        )
    );

    // Later calls get llm-edge's own 429 while a cools down (b is dead).
    let resp = edge.chat("m").await;
    assert_error(resp, 429, "upstream_rate_limited").await;
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_5xx_is_retried_on_another_key() {
    let mock = Mock::start(|r| match key_of(r) {
        "a" => Reply::json(503, r#"{"error":"overloaded"}"#),
        _ => ok_reply(r),
    });
    let edge = Edge::start(&config(&mock.url(), &keys_yaml(&["a", "b"]), ""));

    let resp = edge.chat("m").await;
    assert_eq!(
        keys_seen(&mock),
        ["a", "b"],
        "one upstream replica: the retry goes to the other key"
    );
    assert_eq!(assert_ok(resp).await, "b");
    // A 5xx does not cool the key or kill it.
    let (_, v) = edge.admin_keys().await;
    assert_eq!(admin_key(&v, "a")["state"], "up", "{v}");
    assert_eq!(admin_key(&v, "a")["last_error"], "upstream_5xx", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_waits_for_a_free_slot_only_until_the_retry_deadline() {
    let mock = Mock::start(|r| slow_stream(ms(1000)).header("x-mock-key", key_of(r)));
    let keys = format!("[{}]", key_entry("a", "max_concurrent: 1"));
    let edge = Edge::start(&config(
        &mock.url(),
        &keys,
        "    retries: {deadline: 400ms}",
    ));

    let slow = edge.post(CHAT, stream_body("m")).await;
    assert_eq!(slow.status(), 200);
    let sent = Instant::now();
    let resp = edge.post(CHAT, stream_body("m")).await;
    let waited = sent.elapsed();
    let retry_after = resp.headers().get("retry-after").cloned();
    assert_error(resp, 429, "upstream_rate_limited").await;
    assert!(retry_after.is_some(), "Retry-After on the 429");
    assert!(
        waited >= ms(350) && waited < ms(900),
        "waited {waited:?} for a slot, the deadline is 400 ms"
    );
    assert_eq!(mock.requests().len(), 1, "the capped key got nothing more");

    let body = within(Duration::from_secs(5), "the slow stream", slow.bytes())
        .await
        .unwrap();
    assert_eq!(body, SLOW_STREAM_BODY.as_bytes());
    let resp = edge.post(CHAT, stream_body("m")).await;
    assert_eq!(resp.status(), 200, "the slot is free again");
    assert_eq!(resp.bytes().await.unwrap(), SLOW_STREAM_BODY.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_moves_off_a_rate_limited_key_and_stays_on_the_new_one() {
    let limited: Arc<Mutex<BTreeSet<&'static str>>> = Arc::default();
    let script = limited.clone();
    let mock = Mock::start(move |r| {
        let id = key_of(r);
        if script.lock().unwrap().contains(id) {
            rate_limited_reply(id, 30)
        } else {
            ok_reply(r)
        }
    });
    let edge = Edge::start(&config(
        &mock.url(),
        &keys_yaml(&["a", "b", "c", "d"]),
        "    key_strategy: session",
    ));
    let s1 = "/sessions/s1/v1/chat/completions";

    let first = edge.chat_ok(s1, "m").await;
    let first_id = test_key(&first).id;
    limited.lock().unwrap().insert(first_id);
    let moved = edge.chat_ok(s1, "m").await;
    assert_ne!(moved, first, "the 429 is retried on another key");
    for _ in 0..10 {
        assert_eq!(
            edge.chat_ok(s1, "m").await,
            moved,
            "s1 stays on its new key"
        );
    }
    let seen = keys_seen(&mock);
    assert_eq!(
        seen.iter().filter(|k| **k == first_id).count(),
        2,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pass_through_route_uses_a_live_pool_key_not_the_clients() {
    let mock = Mock::start(|r| {
        if r.uri.starts_with(CHAT) && key_of(r) == "a" {
            unauthorized_reply("a")
        } else {
            ok_reply(r)
        }
    });
    let yaml = config(&mock.url(), &keys_yaml(&["a", "b"]), "")
        + "routes:\n  - {prefix: /raw/, upstream: u, strip_prefix: true}\n";
    let edge = Edge::start(&yaml);

    // An API call finds a refused; pass-through requests then use b only.
    assert_eq!(edge.chat_ok(CHAT, "m").await, "b");
    for _ in 0..4 {
        let resp = edge
            .http
            .get(edge.proxy.url("/raw/v1/files"))
            .header("authorization", "Bearer client-token-not-for-upstream")
            .send()
            .await
            .unwrap();
        assert_eq!(assert_ok(resp).await, "b");
    }
    let files: Vec<&str> = mock
        .requests()
        .iter()
        .filter(|r| r.uri == "/v1/files")
        .map(key_of)
        .collect();
    assert_eq!(files, ["b"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_request_waits_for_a_busy_key_instead_of_failing() {
    // b (capped at 1) is busy with a slow stream when a answers 429: the call should wait for
    // b's slot (within retries.deadline) rather than give up while a key is still eligible.
    let mock = Mock::start(|r| {
        let id = key_of(r);
        if r.body_str().contains("\"stream\":true") {
            slow_stream(ms(800)).header("x-mock-key", id)
        } else if id == "a" {
            rate_limited_reply("a", 30)
        } else {
            ok_reply(r)
        }
    });
    // b first: round robin sends the stream to b, the next call to a.
    let keys = format!(
        "[{}, {}]",
        key_entry("b", "max_concurrent: 1"),
        key_entry("a", "")
    );
    let edge = Edge::start(&config(&mock.url(), &keys, "    retries: {deadline: 5s}"));

    let slow = edge.post(CHAT, stream_body("m")).await;
    assert_eq!(slow.status(), 200);
    assert_eq!(key_of(&mock.only_request()), "b");
    let resp = edge.chat("m").await;
    let status = resp.status().as_u16();
    let answered_by = resp
        .headers()
        .get("x-mock-key")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = within(Duration::from_secs(5), "the slow stream", slow.bytes()).await;
    assert_eq!(
        (status, answered_by.as_deref()),
        (200, Some("b")),
        "429 on a, then b once its slot was free; upstream saw {:?}",
        keys_seen(&mock)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_leaving_mid_stream_releases_the_key_slot() {
    let mock = Mock::start(|r| slow_stream(ms(3000)).header("x-mock-key", key_of(r)));
    let keys = format!("[{}]", key_entry("a", "max_concurrent: 1"));
    let edge = Edge::start(&config(&mock.url(), &keys, "    retries: {deadline: 5s}"));

    let slow = edge.post(CHAT, stream_body("m")).await;
    assert_eq!(slow.status(), 200);
    let (_, v) = edge.admin_keys().await;
    assert_eq!(admin_key(&v, "a")["in_flight"], 1, "{v}");
    drop(slow);

    let log = mock.wait_stream(1, Duration::from_secs(1)).await;
    let ended = log.wait_end(Duration::from_secs(2)).await;
    assert!(
        matches!(ended, Some((_, StreamEnd::Dropped))),
        "the upstream stream is dropped when the client leaves: {ended:?}"
    );
    within(Duration::from_secs(2), "the slot released", async {
        while admin_key(&edge.admin_keys().await.1, "a")["in_flight"] != 0 {
            tokio::time::sleep(ms(10)).await;
        }
    })
    .await;
    // The capped key takes the next call at once (no wait for a slot that was never freed).
    let sent = Instant::now();
    let resp = edge.post(CHAT, chat_body("m")).await;
    assert_eq!(resp.status(), 200);
    assert!(sent.elapsed() < ms(1000), "took {:?}", sent.elapsed());
}
