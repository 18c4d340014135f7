//! End-to-end tests of the edge's security: client keys (`Authorization: Bearer` or `x-api-key`,
//! stored plain or as a SHA-256), model allow-lists, per-key rate limits (requests, tokens,
//! concurrency), CORS, request limits (body, URI, headers, slow bodies, load shedding), the admin
//! listener's key, request ids and forwarding headers, and client secrets kept out of logs, admin
//! output, traces and the usage ledger. llm-edge runs in-process in front of a recording mock
//! upstream.

mod common;

use bytes::Bytes;
use common::harness::{free_port, temp_path, Proxy, TempDir};
use common::logs::capture_logs;
use common::mock::{Mock, Recorded, Reply};
use common::{assert_error, assert_error_shape, client, wait_until, within};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";

/// Client key of `alice` (configured as `os.environ/ALICE_KEY`).
const ALICE: &str = "sk-edge-alice-4f1c9a7e20b3-Kq7m";
/// Client key of `bob` (configured only by its SHA-256).
const BOB: &str = "sk-edge-bob-9d2e6b0c3a81-Lr8n";
/// A well-formed key nobody configured.
const STRANGER: &str = "sk-edge-stranger-2a6c8e0f4b17-Zz9z";
/// Upstream pool key of the OpenAI-kind upstream `o`.
const UP_OPENAI: &str = "sk-up-openai-61b8e2d4f09c-Mx3p";
/// Upstream pool key of the Anthropic-kind upstream `a`.
const UP_ANTHROPIC: &str = "sk-ant-up-0c7f3e9a5d12-Nw4s";
/// The admin listener's key (`os.environ/ADMIN_KEY`).
const ADMIN: &str = "admin-key-5e8b1d3f7a90c2e4";

const ALLOWED_ORIGIN: &str = "https://app.example.com";
const EVIL_ORIGIN: &str = "https://evil.example.com";

/// The environment every proxy of this file resolves `os.environ/NAME` from.
fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ALICE_KEY", ALICE),
        ("UP_OPENAI_KEY", UP_OPENAI),
        ("UP_ANTHROPIC_KEY", UP_ANTHROPIC),
        ("ADMIN_KEY", ADMIN),
    ]
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Alice's `auth.keys` entry; `extra` adds fields (`models: [qwen]`, `rate_limit: {...}`).
fn alice(extra: &str) -> String {
    if extra.is_empty() {
        "{id: alice, key: os.environ/ALICE_KEY}".to_string()
    } else {
        format!("{{id: alice, key: os.environ/ALICE_KEY, {extra}}}")
    }
}

/// Bob's `auth.keys` entry, by SHA-256 only; `extra` as for [`alice`].
fn bob(extra: &str) -> String {
    let hash = sha256_hex(BOB);
    if extra.is_empty() {
        format!("{{id: bob, key_sha256: \"{hash}\"}}")
    } else {
        format!("{{id: bob, key_sha256: \"{hash}\", {extra}}}")
    }
}

/// An `auth:` section listing `entries`.
fn auth_keys(entries: &[String]) -> String {
    let mut s = "auth:\n  keys:\n".to_string();
    for e in entries {
        s.push_str(&format!("    - {e}\n"));
    }
    s
}

/// Alice and Bob, without limits.
fn both_keys() -> String {
    auth_keys(&[alice(""), bob("")])
}

/// Upstreams `o` (openai, pool key `up-o`), `a` (anthropic, pool key `up-a`) and `v` (vllm, no
/// key) at `url`, and `d` (vllm, nothing listening). Models `qwen` and `gpt` on `o`, `claude` on
/// `a`, `local` on `v`, `gone` on `d`; pass-through `/raw/` to `o`. `auth` is the whole `auth:` section, `extra` more top-level
/// sections.
fn config(url: &str, auth: &str, extra: &str) -> String {
    let down = free_port();
    format!(
        r#"
upstreams:
  o:
    kind: openai
    endpoints: ["{url}"]
    keys: [{{id: up-o, key: os.environ/UP_OPENAI_KEY}}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  a:
    kind: anthropic
    endpoints: ["{url}"]
    keys: [{{id: up-a, key: os.environ/UP_ANTHROPIC_KEY}}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  v:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  d:
    kind: vllm
    endpoints: ["http://127.0.0.1:{down}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: qwen, upstream: o}}
  - {{name: gpt, upstream: o}}
  - {{name: claude, upstream: a}}
  - {{name: local, upstream: v}}
  - {{name: gone, upstream: d}}
routes:
  - {{prefix: /raw/, upstream: o, strip_prefix: true}}
{auth}{extra}
"#
    )
}

fn chat_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

fn messages_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// The mock's chat completion: 80 + 40 tokens.
const CHAT_REPLY: &str = r#"{"id":"chatcmpl-sec","object":"chat.completion","created":1700000000,"model":"qwen","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":80,"completion_tokens":40,"total_tokens":120}}"#;

fn ok_reply(_: &Recorded) -> Reply {
    Reply::json(200, CHAT_REPLY)
}

/// A 200 JSON reply whose body takes `hold` to complete (the request stays in flight).
fn slow_reply(hold: Duration) -> Reply {
    Reply::status(200)
        .header("content-type", "application/json")
        .chunks(vec![
            (ms(0), Bytes::from_static(b"{\"id\":\"chatcmpl-slow\",")),
            (hold, Bytes::from_static(b"\"object\":\"chat.completion\"}")),
        ])
}
const SLOW_REPLY_BODY: &str = r#"{"id":"chatcmpl-slow","object":"chat.completion"}"#;

/// How long a held reply takes to complete.
const HOLD: Duration = Duration::from_millis(1000);

/// The mock of the in-flight tests: a request carrying `x-test-hold` gets a reply whose body
/// takes [`HOLD`] to complete; every other one is answered at once.
fn held_or_ok(r: &Recorded) -> Reply {
    if r.header("x-test-hold").is_some() {
        slow_reply(HOLD)
    } else {
        ok_reply(r)
    }
}

/// Starts a held chat call with `key` (see [`held_or_ok`]) and returns once the upstream has it;
/// the task yields the response body.
async fn start_held(
    edge: &Arc<Edge>,
    mock: &Mock,
    key: &'static str,
) -> tokio::task::JoinHandle<String> {
    let before = mock.requests().len();
    let e = edge.clone();
    let task = tokio::spawn(async move {
        let resp = e
            .post(
                CHAT,
                chat_body("qwen"),
                Cred::Bearer(key),
                &[("x-test-hold", "1")],
            )
            .await;
        assert_ok(resp).await
    });
    assert!(
        wait_until(Duration::from_secs(5), || mock.requests().len() > before).await,
        "the held request reached the upstream"
    );
    task
}

/// A chat call with `key` on `http` (a client of its own, so on another connection).
async fn post_on(http: &reqwest::Client, edge: &Edge, key: &str) -> reqwest::Response {
    let req = http
        .post(edge.proxy.url(CHAT))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(chat_body("qwen"));
    edge.send(req).await
}

/// The proxy releases a request's slots and charges its tokens as it finishes the request, a
/// moment after the client has the last byte; tests that depend on that wait this long first.
async fn settle() {
    tokio::time::sleep(ms(100)).await;
}

/// How a request presents its client key.
#[derive(Clone, Copy, Debug)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    XApiKey(&'a str),
    Raw(&'a str),
}

impl Cred<'_> {
    fn apply(self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Cred::None => req,
            Cred::Bearer(k) => req.header("authorization", format!("Bearer {k}")),
            Cred::XApiKey(k) => req.header("x-api-key", k),
            Cred::Raw(v) => req.header("authorization", v),
        }
    }
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
            proxy: Proxy::start_with_env(yaml, &env()),
            http: client(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> reqwest::Response {
        within(
            Duration::from_secs(10),
            "a request through the proxy",
            async { req.send().await.expect("request through the proxy") },
        )
        .await
    }

    /// POSTs a JSON `body` with `cred` and extra `headers`.
    async fn post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        cred: Cred<'_>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.proxy.url(path))
            .header("content-type", "application/json")
            .body(body);
        req = cred.apply(req);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    async fn chat(&self, model: &str, cred: Cred<'_>) -> reqwest::Response {
        self.post(CHAT, chat_body(model), cred, &[]).await
    }

    async fn get(&self, path: &str, cred: Cred<'_>) -> reqwest::Response {
        self.send(cred.apply(self.http.get(self.proxy.url(path))))
            .await
    }

    /// GET on the admin listener, with `Authorization: Bearer <bearer>` when given.
    async fn admin_get(&self, path: &str, bearer: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.proxy.admin_url(path));
        if let Some(k) = bearer {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        self.send(req).await
    }
}

/// A header of a response as text.
fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_string())
}

/// Asserts a 200 and returns the body.
async fn assert_ok(resp: reqwest::Response) -> String {
    let status = resp.status().as_u16();
    let body = within(Duration::from_secs(10), "reading the response", resp.text())
        .await
        .expect("response body");
    assert_eq!(status, 200, "status; body: {body}");
    body
}

/// Asserts a 200 with the mock's chat completion, unchanged.
async fn assert_chat_ok(resp: reqwest::Response) {
    assert_eq!(
        assert_ok(resp).await,
        CHAT_REPLY,
        "the mock's body, unchanged"
    );
}

/// A response read whole: its status line, headers and body as one text (for secret greps).
async fn read_all(resp: reqwest::Response) -> String {
    let mut text = format!("{}\n", resp.status());
    for (k, v) in resp.headers() {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let body = resp.bytes().await.expect("response body");
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&body));
    text
}

/// Asserts that neither `secret` nor its hidden middle occurs in `text`.
fn assert_absent(what: &str, secret: &str, text: &str) {
    let middle = &secret[3..secret.len() - 4];
    assert!(
        !text.contains(secret) && !text.contains(middle),
        "{what} contains the client key {secret:?}:\n{text}"
    );
}

/// Asserts that no header value and no body byte of a recorded request holds a client key.
fn assert_no_client_key(r: &Recorded) {
    for (name, value) in &r.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        for secret in [ALICE, BOB, STRANGER] {
            assert_absent(&format!("upstream header {name}"), secret, &v);
        }
    }
    for secret in [ALICE, BOB, STRANGER] {
        assert_absent(
            "the upstream request body",
            secret,
            &String::from_utf8_lossy(&r.body),
        );
    }
}

/// Names of the `access-control-*` headers of a response.
fn cors_headers(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Client authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_and_x_api_key_work_alike_on_openai_and_anthropic_routes() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(&mock.url(), &both_keys(), ""));

    for cred in [Cred::Bearer(ALICE), Cred::XApiKey(ALICE)] {
        assert_chat_ok(edge.chat("qwen", cred).await).await;
        let resp = edge
            .post(MESSAGES, messages_body("claude"), cred, &[])
            .await;
        assert_chat_ok(resp).await;
        // A keyless upstream gets no credential at all, least of all the client's.
        assert_chat_ok(edge.chat("local", cred).await).await;
    }

    let seen = mock.requests();
    let routes: Vec<&str> = seen.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(routes, [CHAT, MESSAGES, CHAT, CHAT, MESSAGES, CHAT]);
    for r in &seen {
        assert_no_client_key(r);
        let model = serde_json::from_slice::<Value>(&r.body).unwrap()["model"].clone();
        if model == "local" {
            assert!(r.header_all("authorization").is_empty(), "{:?}", r.headers);
            assert!(r.header_all("x-api-key").is_empty(), "{:?}", r.headers);
        } else if r.uri == CHAT {
            assert_eq!(
                r.header_all("authorization"),
                [format!("Bearer {UP_OPENAI}")],
                "the OpenAI pool key, once"
            );
            assert!(r.header_all("x-api-key").is_empty(), "{:?}", r.headers);
        } else {
            assert_eq!(
                r.header_all("x-api-key"),
                [UP_ANTHROPIC],
                "the Anthropic pool key, once"
            );
            assert!(r.header_all("authorization").is_empty(), "{:?}", r.headers);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_and_wrong_keys_are_401_openai_shaped() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(&mock.url(), &both_keys(), ""));

    let basic = format!("Basic {ALICE}");
    let refused = [
        Cred::None,
        Cred::Bearer(STRANGER),
        Cred::XApiKey(STRANGER),
        Cred::Raw(&basic),
        Cred::Raw("Bearer "),
    ];
    for cred in refused {
        let v = assert_error(edge.chat("qwen", cred).await, 401, "invalid_api_key").await;
        assert_eq!(v["error"]["type"], "authentication_error", "{cred:?}: {v}");
        let resp = edge
            .post(MESSAGES, messages_body("claude"), cred, &[])
            .await;
        assert_error(resp, 401, "invalid_api_key").await;
        // A pass-through route and the model list need the key too.
        assert_error(
            edge.get("/raw/v1/files", cred).await,
            401,
            "invalid_api_key",
        )
        .await;
        assert_error(edge.get("/v1/models", cred).await, 401, "invalid_api_key").await;
    }
    assert_eq!(mock.requests().len(), 0, "nothing reached the upstream");

    // With the key, the same requests go through.
    let models = assert_ok(edge.get("/v1/models", Cred::Bearer(ALICE)).await).await;
    assert!(models.contains("\"qwen\""), "{models}");
    assert_chat_ok(edge.get("/raw/v1/files", Cred::XApiKey(ALICE)).await).await;
    let r = mock.only_request();
    assert_eq!(r.uri, "/v1/files");
    assert_no_client_key(&r);
    assert_eq!(
        r.header_all("authorization"),
        [format!("Bearer {UP_OPENAI}")]
    );
}

/// `llm-edge -t -c <file>` with `text` in the file: exit success, stdout, stderr.
fn test_flag(name: &str, text: &str) -> (bool, String, String) {
    let path = temp_path(name);
    std::fs::write(&path, text).expect("write the temp config");
    let out = Command::new(env!("CARGO_BIN_EXE_llm-edge"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .env_remove("LLM_EDGE_LOG")
        .output()
        .expect("run llm-edge -t");
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_auth_section_refuses_to_start_and_open_mode_must_be_explicit() {
    let base = format!(
        "listen: [\"127.0.0.1:{}\"]\nupstreams:\n  v: {{kind: vllm, endpoints: [\"http://127.0.0.1:{}\"]}}\nmodels:\n  - {{name: m, upstream: v}}\n",
        free_port(),
        free_port()
    );

    let (ok, stdout, stderr) = test_flag("no-auth.yaml", &base);
    assert!(
        !ok,
        "no auth: section must fail\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.lines().any(|l| l.trim_start().starts_with("auth")),
        "stderr names the auth section:\n{stderr}"
    );

    let (ok, stdout, stderr) = test_flag("open.yaml", &format!("{base}auth: {{mode: open}}\n"));
    assert!(
        ok,
        "auth: {{mode: open}} is valid\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("warn") && l.contains("auth") && l.contains("open")),
        "open mode is warned about:\n{stderr}"
    );

    // The same through the library: no auth section is a config error naming `auth`.
    let e = llm_edge::config::from_yaml_str(&base, &|_| None)
        .expect_err("a config without auth: is refused");
    assert!(e.problems.iter().any(|p| p.starts_with("auth")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_sha256_form_authenticates() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(&mock.url(), &both_keys(), ""));

    assert_chat_ok(edge.chat("qwen", Cred::Bearer(BOB)).await).await;
    assert_chat_ok(edge.chat("qwen", Cred::XApiKey(BOB)).await).await;
    // The configured hash is not itself a credential.
    let resp = edge.chat("qwen", Cred::Bearer(&sha256_hex(BOB))).await;
    assert_error(resp, 401, "invalid_api_key").await;

    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_no_client_key(r);
        assert_absent(
            "an upstream request",
            &sha256_hex(BOB),
            &format!("{:?}", r.headers),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_allow_list_is_403() {
    let mock = Mock::start(ok_reply);
    let keys = auth_keys(&[alice("models: [qwen]"), bob("")]);
    let edge = Edge::start(&config(&mock.url(), &keys, ""));

    let v = assert_error(
        edge.chat("gpt", Cred::Bearer(ALICE)).await,
        403,
        "model_not_allowed",
    )
    .await;
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    let resp = edge
        .post(MESSAGES, messages_body("claude"), Cred::XApiKey(ALICE), &[])
        .await;
    assert_error(resp, 403, "model_not_allowed").await;
    assert_eq!(mock.requests().len(), 0, "the mock is untouched");

    assert_chat_ok(edge.chat("qwen", Cred::Bearer(ALICE)).await).await;
    // Bob has no allow-list.
    assert_chat_ok(edge.chat("gpt", Cred::Bearer(BOB)).await).await;
    let models: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["model"].to_string())
        .collect();
    assert_eq!(models, ["\"qwen\"", "\"gpt\""]);
}

// ---------------------------------------------------------------------------------------------
// Per-key rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_limit_answers_429_with_openai_rate_limit_headers() {
    let mock = Mock::start(ok_reply);
    let keys = auth_keys(&[alice("rate_limit: {rpm: 3}"), bob("rate_limit: {rpm: 3}")]);
    let edge = Edge::start(&config(&mock.url(), &keys, ""));
    let reset = regex::Regex::new(r"^(\d+ms|\d+s|\d+m\d+s)$").unwrap();

    for left in ["2", "1", "0"] {
        let resp = edge.chat("qwen", Cred::Bearer(ALICE)).await;
        assert_eq!(
            header(&resp, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests").as_deref(),
            Some(left)
        );
        let r = header(&resp, "x-ratelimit-reset-requests").expect("x-ratelimit-reset-requests");
        assert!(reset.is_match(&r), "reset notation: {r:?}");
        assert_chat_ok(resp).await;
    }

    let resp = edge.chat("qwen", Cred::Bearer(ALICE)).await;
    let retry: u64 = header(&resp, "retry-after")
        .expect("Retry-After on the 429")
        .parse()
        .expect("Retry-After in seconds");
    // 3 per minute: the next request is allowed 20 s after the first.
    assert!((1..=20).contains(&retry), "Retry-After: {retry}");
    let v = assert_error(resp, 429, "rate_limit_exceeded").await;
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert_eq!(
        mock.requests().len(),
        3,
        "the refused request never reached the upstream"
    );

    // Bob's minute is his own.
    let resp = edge.chat("qwen", Cred::Bearer(BOB)).await;
    assert_eq!(
        header(&resp, "x-ratelimit-remaining-requests").as_deref(),
        Some("2")
    );
    assert_chat_ok(resp).await;
    assert_eq!(mock.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_limit_refuses_the_extra_request() {
    let mock = Mock::start(held_or_ok);
    let keys = auth_keys(&[alice("rate_limit: {concurrent: 1}"), bob("")]);
    let edge = Arc::new(Edge::start(&config(&mock.url(), &keys, "")));

    let first = start_held(&edge, &mock, ALICE).await;

    // A second connection, while the first request is still being answered.
    let other = client();
    let resp = post_on(&other, &edge, ALICE).await;
    assert!(
        !first.is_finished(),
        "the first request was still in flight"
    );
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("1"));
    let v = assert_error(resp, 429, "rate_limit_exceeded").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent"),
        "{v}"
    );
    // Bob is not limited by Alice's request in flight.
    assert_chat_ok(post_on(&other, &edge, BOB).await).await;
    assert!(
        !first.is_finished(),
        "the first request was still in flight"
    );

    let body = within(Duration::from_secs(5), "the first request", first)
        .await
        .expect("first request task");
    assert_eq!(body, SLOW_REPLY_BODY, "the first request completed");
    assert_eq!(
        mock.requests().len(),
        2,
        "the refused request never reached the upstream"
    );

    settle().await;
    assert_chat_ok(post_on(&other, &edge, ALICE).await).await;
    assert_eq!(mock.requests().len(), 3, "the slot is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm_limit_applies_after_observed_usage() {
    let mock = Mock::start(ok_reply);
    let keys = auth_keys(&[alice("rate_limit: {tpm: 100}"), bob("")]);
    let edge = Edge::start(&config(&mock.url(), &keys, ""));

    let resp = edge.chat("qwen", Cred::Bearer(ALICE)).await;
    assert_eq!(
        header(&resp, "x-ratelimit-limit-tokens").as_deref(),
        Some("100")
    );
    assert_chat_ok(resp).await;

    // The reply reported 120 tokens: over 100 per minute until 12 s have passed.
    settle().await;
    let resp = edge.chat("qwen", Cred::Bearer(ALICE)).await;
    let retry: u64 = header(&resp, "retry-after")
        .expect("Retry-After on the 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=12).contains(&retry), "Retry-After: {retry}");
    let v = assert_error(resp, 429, "rate_limit_exceeded").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{v}"
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "the mock saw the first request only"
    );

    // Bob has no token limit.
    assert_chat_ok(edge.chat("qwen", Cred::Bearer(BOB)).await).await;
}

// ---------------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------------

/// `OPTIONS <path>` as a browser sends it before a keyed JSON POST from `origin`.
async fn preflight(edge: &Edge, path: &str, origin: &str) -> reqwest::Response {
    let req = edge
        .http
        .request(reqwest::Method::OPTIONS, edge.proxy.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        );
    edge.send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_preflight_allowed_and_denied() {
    let mock = Mock::start(ok_reply);
    let cors =
        format!("cors: {{allow_origins: [\"{ALLOWED_ORIGIN}\"], allow_credentials: true}}\n");
    let edge = Edge::start(&config(&mock.url(), &both_keys(), &cors));

    // An allowed preflight needs no key.
    let resp = preflight(&edge, CHAT, ALLOWED_ORIGIN).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(ALLOWED_ORIGIN)
    );
    assert_eq!(
        header(&resp, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let methods = header(&resp, "access-control-allow-methods").expect("allow-methods");
    assert!(methods.split(", ").any(|m| m == "POST"), "{methods}");
    let allowed = header(&resp, "access-control-allow-headers").expect("allow-headers");
    for h in ["authorization", "content-type"] {
        assert!(allowed.split(", ").any(|a| a == h), "{h} in {allowed}");
    }
    assert_eq!(header(&resp, "vary").as_deref(), Some("Origin"));
    assert!(header(&resp, "access-control-max-age").is_some());
    assert!(resp.bytes().await.unwrap().is_empty(), "no body");

    // Another origin is refused, and told nothing it could use.
    let resp = preflight(&edge, CHAT, EVIL_ORIGIN).await;
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers());
    assert_error(resp, 403, "origin_not_allowed").await;
    assert_eq!(
        mock.requests().len(),
        0,
        "preflights never reach the upstream"
    );

    // The actual request from the allowed origin carries the CORS headers…
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("origin", ALLOWED_ORIGIN)],
        )
        .await;
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(ALLOWED_ORIGIN)
    );
    assert_eq!(
        header(&resp, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let exposed = header(&resp, "access-control-expose-headers").expect("expose-headers");
    assert!(exposed.contains("x-request-id"), "{exposed}");
    assert_chat_ok(resp).await;
    // …as does a pass-through response…
    let resp = edge
        .send(
            Cred::Bearer(ALICE)
                .apply(edge.http.get(edge.proxy.url("/raw/v1/files")))
                .header("origin", ALLOWED_ORIGIN),
        )
        .await;
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(ALLOWED_ORIGIN)
    );
    assert_chat_ok(resp).await;
    // …and an error, so the page can read it.
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::None,
            &[("origin", ALLOWED_ORIGIN)],
        )
        .await;
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(ALLOWED_ORIGIN)
    );
    assert_error(resp, 401, "invalid_api_key").await;
    // From another origin the call still needs only the key, but gets no CORS header.
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("origin", EVIL_ORIGIN)],
        )
        .await;
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers());
    assert_chat_ok(resp).await;
    drop(edge);

    // Without a cors: section nothing CORS happens.
    let edge = Edge::start(&config(&mock.url(), &both_keys(), ""));
    let resp = preflight(&edge, CHAT, ALLOWED_ORIGIN).await;
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers());
    // Not answered as a preflight: an ordinary request that needs a key.
    assert_error(resp, 401, "invalid_api_key").await;
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("origin", ALLOWED_ORIGIN)],
        )
        .await;
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers());
    assert_chat_ok(resp).await;
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::None,
            &[("origin", ALLOWED_ORIGIN)],
        )
        .await;
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers());
    assert_error(resp, 401, "invalid_api_key").await;
}

/// A cache keyed by the upstream's `Vary` must keep it: CORS adds `Origin` to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn cors_adds_origin_to_the_upstreams_vary() {
    let mock = Mock::replying(Reply::json(200, CHAT_REPLY).header("vary", "Accept-Encoding"));
    let cors = format!("cors: {{allow_origins: [\"{ALLOWED_ORIGIN}\"]}}\n");
    let edge = Edge::start(&config(&mock.url(), &both_keys(), &cors));

    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("origin", ALLOWED_ORIGIN)],
        )
        .await;
    let vary: Vec<String> = resp
        .headers()
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    assert!(vary.iter().any(|t| t == "origin"), "Vary: {vary:?}");
    assert!(
        vary.iter().any(|t| t == "accept-encoding"),
        "Vary: {vary:?}"
    );
    assert_chat_ok(resp).await;
}

// ---------------------------------------------------------------------------------------------
// Request limits
// ---------------------------------------------------------------------------------------------

/// A chat body of exactly `len` bytes (padded in a string field).
fn chat_body_of_len(len: usize) -> String {
    let head = r#"{"model":"qwen","messages":[{"role":"user","content":"hi"}],"pad":""#;
    let tail = r#""}"#;
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_body_is_413() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "limits: {max_body: 1KiB}\n",
    ));

    // Exactly the limit passes.
    assert_chat_ok(
        edge.post(CHAT, chat_body_of_len(1024), Cred::Bearer(ALICE), &[])
            .await,
    )
    .await;
    assert_eq!(mock.requests().len(), 1);

    // One byte more, declared in Content-Length.
    let resp = edge
        .post(CHAT, chat_body_of_len(1025), Cred::Bearer(ALICE), &[])
        .await;
    assert_error(resp, 413, "request_too_large").await;

    // Chunked, with no length announced: refused once the limit is crossed.
    let body = chat_body_of_len(2000).into_bytes();
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(700)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let resp = edge
        .post(
            CHAT,
            reqwest::Body::wrap_stream(futures::stream::iter(chunks)),
            Cred::Bearer(ALICE),
            &[],
        )
        .await;
    assert_error(resp, 413, "request_too_large").await;

    assert_eq!(
        mock.requests().len(),
        1,
        "no oversized body reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_uri_is_414() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "limits: {max_uri: 256}\n",
    ));

    let path_of = |len: usize| {
        let head = "/raw/v1/files?q=";
        format!("{head}{}", "a".repeat(len - head.len()))
    };
    assert_chat_ok(edge.get(&path_of(256), Cred::Bearer(ALICE)).await).await;
    assert_eq!(mock.requests().len(), 1);

    let resp = edge.get(&path_of(257), Cred::Bearer(ALICE)).await;
    assert_error(resp, 414, "uri_too_long").await;
    let resp = edge
        .post(
            &format!("{CHAT}?{}", "b".repeat(300)),
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[],
        )
        .await;
    assert_error(resp, 414, "uri_too_long").await;
    assert_eq!(
        mock.requests().len(),
        1,
        "the long URIs never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_or_large_headers_is_431() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "limits: {max_headers: 20, max_header_bytes: 4KiB}\n",
    ));

    let many: Vec<(String, String)> = (0..25).map(|i| (format!("x-h{i}"), "1".into())).collect();

    let send = |extra: Vec<(String, String)>| {
        let mut req = edge
            .http
            .post(edge.proxy.url(CHAT))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {ALICE}"))
            .body(chat_body("qwen"));
        for (k, v) in extra {
            req = req.header(k, v);
        }
        edge.send(req)
    };

    assert_chat_ok(send(many[..5].to_vec()).await).await;
    assert_eq!(mock.requests().len(), 1);

    let v = assert_error(send(many.clone()).await, 431, "headers_too_large").await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("20"),
        "{v}"
    );

    let big = vec![("x-big".to_string(), "b".repeat(5000))];
    assert_error(send(big).await, 431, "headers_too_large").await;
    assert_eq!(
        mock.requests().len(),
        1,
        "the refused requests never reached the upstream"
    );
}

/// What came back on a raw connection: the whole text up to the peer's close, and when the
/// close came (`None` if the connection was still open after `wait`).
async fn read_until_close(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    wait: Duration,
) -> (String, Option<Instant>) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

/// Splits a raw HTTP/1.1 response into its status code, head and body.
fn parse_raw(text: &str) -> (u16, String, String) {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The request head of a keyed chat POST announcing `length` body bytes.
fn raw_head(length: usize) -> String {
    format!(
        "POST {CHAT} HTTP/1.1\r\nHost: llm-edge\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_body_is_408() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "limits: {body_timeout: 300ms, min_body_rate: 1KiB}\n",
    ));

    // A few bytes, then silence longer than body_timeout.
    let mut conn = tokio::net::TcpStream::connect(edge.proxy.addr())
        .await
        .expect("connect");
    let started = Instant::now();
    conn.write_all(format!("{}{{\"model\":\"qwen\"", raw_head(1000)).as_bytes())
        .await
        .unwrap();
    let (text, closed) = read_until_close(&mut conn, Duration::from_secs(5)).await;
    let closed = closed.unwrap_or_else(|| panic!("the connection stays open: {text:?}"));
    let waited = closed - started;
    assert!(
        waited >= ms(300),
        "answered after {waited:?}, before body_timeout"
    );
    assert!(waited < ms(2000), "answered only after {waited:?}");
    let (status, head, body) = parse_raw(&text);
    assert_eq!(status, 408, "{text}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_error_shape(&v, "request_timeout");

    // A trickle: every read comes within body_timeout, but the average is far below
    // min_body_rate once body_timeout has passed.
    let conn = tokio::net::TcpStream::connect(edge.proxy.addr())
        .await
        .expect("connect");
    let (mut rd, mut wr) = conn.into_split();
    let started = Instant::now();
    wr.write_all(format!("{}{{\"model\":\"qwen\",\"x\":\"", raw_head(1000)).as_bytes())
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            tokio::time::sleep(ms(100)).await;
            if wr.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    let (text, closed) = read_until_close(&mut rd, Duration::from_secs(5)).await;
    trickle.abort();
    let closed = closed.unwrap_or_else(|| panic!("the connection stays open: {text:?}"));
    let waited = closed - started;
    assert!(
        waited >= ms(300),
        "answered after {waited:?}, before body_timeout"
    );
    assert!(waited < ms(2000), "answered only after {waited:?}");
    let (status, _, body) = parse_raw(&text);
    assert_eq!(status, 408, "{text}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_error_shape(&v, "request_timeout");

    assert_eq!(
        mock.requests().len(),
        0,
        "no partial body reached the upstream"
    );
    // A body sent at once still works.
    assert_chat_ok(edge.chat("qwen", Cred::Bearer(ALICE)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_max_concurrent_requests_is_503() {
    let mock = Mock::start(held_or_ok);
    let edge = Arc::new(Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "limits: {max_concurrent_requests: 1}\n",
    )));

    let first = start_held(&edge, &mock, ALICE).await;

    // Another client (another key, another connection) while the first is in flight.
    let other = client();
    let resp = post_on(&other, &edge, BOB).await;
    assert!(
        !first.is_finished(),
        "the first request was still in flight"
    );
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("1"));
    let v = assert_error(resp, 503, "overloaded").await;
    assert_eq!(v["error"]["type"], "server_error", "{v}");

    let body = within(Duration::from_secs(5), "the first request", first)
        .await
        .expect("first request task");
    assert_eq!(body, SLOW_REPLY_BODY);
    assert_eq!(
        mock.requests().len(),
        1,
        "the shed request never reached the upstream"
    );

    settle().await;
    assert_chat_ok(post_on(&other, &edge, BOB).await).await;
}

// ---------------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_listener_requires_its_key_when_set() {
    let mock = Mock::start(ok_reply);
    let admin = format!(
        "admin: {{listen: \"127.0.0.1:{}\", key: os.environ/ADMIN_KEY}}\n",
        free_port()
    );
    let edge = Edge::start(&config(&mock.url(), &both_keys(), &admin));

    for (path, bearer) in [
        ("/admin/keys", None),
        ("/admin/keys", Some(ALICE)),
        ("/admin/keys", Some("admin-key-5e8b1d3f7a90c2e")),
        ("/metrics", None),
        ("/admin/traces", None),
    ] {
        let resp = edge.admin_get(path, bearer).await;
        assert_error(resp, 401, "invalid_api_key").await;
    }
    let resp = edge.admin_get("/admin/keys", Some(ADMIN)).await;
    let keys = assert_ok(resp).await;
    assert!(keys.contains("\"up-o\""), "{keys}");
    assert_absent("/admin/keys", UP_OPENAI, &keys);
    assert_ok(edge.admin_get("/metrics", Some(ADMIN)).await).await;
    // Health checks are open.
    assert_ok(edge.admin_get("/health/live", None).await).await;

    // The main listener does not serve the admin API, with or without keys.
    for cred in [Cred::None, Cred::Bearer(ALICE), Cred::Bearer(ADMIN)] {
        let resp = edge.get("/admin/keys", cred).await;
        let status = resp.status();
        let text = read_all(resp).await;
        assert_ne!(
            status, 200,
            "/admin/keys on the main listener with {cred:?}: {text}"
        );
        assert!(!text.contains("up-o"), "{text}");
    }

    // Config: a non-loopback admin listener needs a key.
    let text = |admin: &str| {
        format!(
            "listen: [\"127.0.0.1:{}\"]\nauth: {{mode: open}}\nadmin: {admin}\n",
            free_port()
        )
    };
    let env = |name: &str| (name == "ADMIN_KEY").then(|| ADMIN.to_string());
    let port = free_port();
    let e =
        llm_edge::config::from_yaml_str(&text(&format!("{{listen: \"0.0.0.0:{port}\"}}")), &env)
            .expect_err("0.0.0.0 without admin.key is refused");
    assert!(e.to_string().contains("admin.key"), "{e}");
    let with_key = format!("{{listen: \"0.0.0.0:{port}\", key: os.environ/ADMIN_KEY}}");
    if let Err(e) = llm_edge::config::from_yaml_str(&text(&with_key), &env) {
        panic!("0.0.0.0 with admin.key is valid: {e}");
    }
    let short = |name: &str| (name == "ADMIN_KEY").then(|| "short-key".to_string());
    let e = llm_edge::config::from_yaml_str(&text(&with_key), &short)
        .expect_err("a short admin.key is refused");
    assert!(e.to_string().contains("admin.key"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Request ids and forwarding headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_id_is_accepted_generated_returned_and_forwarded() {
    let mock = Mock::start(ok_reply);
    let edge = Edge::start(&config(&mock.url(), &both_keys(), ""));

    // The client's id is kept.
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("x-request-id", "abc-123")],
        )
        .await;
    assert_eq!(header(&resp, "x-request-id").as_deref(), Some("abc-123"));
    assert_chat_ok(resp).await;
    assert_eq!(mock.requests()[0].header_all("x-request-id"), ["abc-123"]);

    // Without one, a generated id is returned and forwarded.
    let mut generated = Vec::new();
    for _ in 0..2 {
        let resp = edge.chat("qwen", Cred::Bearer(ALICE)).await;
        let id = header(&resp, "x-request-id").expect("x-request-id");
        assert!(id.starts_with("req_"), "{id}");
        assert_chat_ok(resp).await;
        let seen = mock.requests();
        assert_eq!(
            seen.last().unwrap().header_all("x-request-id"),
            [id.as_str()]
        );
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1], "ids are unique");
    // Ids that are too long or not printable ASCII are replaced.
    for bad in ["a".repeat(129), "has space".to_string()] {
        let resp = edge
            .post(
                CHAT,
                chat_body("qwen"),
                Cred::Bearer(ALICE),
                &[("x-request-id", &bad)],
            )
            .await;
        let id = header(&resp, "x-request-id").expect("x-request-id");
        assert!(id.starts_with("req_"), "{bad:?} replaced by {id:?}");
        assert_chat_ok(resp).await;
        assert_eq!(
            mock.requests().last().unwrap().header_all("x-request-id"),
            [id.as_str()]
        );
    }
    // The upstream's own id stays available under another name.
    let theirs =
        Mock::start(|_| Reply::json(200, CHAT_REPLY).header("x-request-id", "upstream-req-9"));
    let edge2 = Edge::start(&config(&theirs.url(), &both_keys(), ""));
    let resp = edge2
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("x-request-id", "abc-124")],
        )
        .await;
    let ids: Vec<&str> = resp
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(ids, ["abc-124"]);
    assert_eq!(
        header(&resp, "x-upstream-request-id").as_deref(),
        Some("upstream-req-9")
    );
    assert_chat_ok(resp).await;
    drop(edge2);

    // Errors answered locally carry the id too.
    let resp = edge
        .post(
            CHAT,
            chat_body("qwen"),
            Cred::None,
            &[("x-request-id", "abc-401")],
        )
        .await;
    assert_eq!(header(&resp, "x-request-id").as_deref(), Some("abc-401"));
    assert_error(resp, 401, "invalid_api_key").await;

    // Forwarding headers from an untrusted peer (loopback, no trusted_proxies) are replaced.
    let spoof = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-real-ip", "7.7.7.7"),
        ("forwarded", "for=8.8.8.8"),
    ];
    assert_chat_ok(
        edge.post(CHAT, chat_body("qwen"), Cred::Bearer(ALICE), &spoof)
            .await,
    )
    .await;
    let mut raw = edge.http.get(edge.proxy.url("/raw/v1/files"));
    raw = Cred::Bearer(ALICE).apply(raw);
    for (k, v) in spoof {
        raw = raw.header(k, v);
    }
    assert_chat_ok(edge.send(raw).await).await;
    let seen = mock.requests();
    for r in &seen[seen.len() - 2..] {
        assert_eq!(
            r.header_all("x-forwarded-for"),
            ["127.0.0.1"],
            "{} {:?}",
            r.uri,
            r.headers
        );
        assert_eq!(r.header_all("x-real-ip"), ["127.0.0.1"], "{}", r.uri);
        assert_eq!(
            r.header_all("forwarded"),
            ["for=127.0.0.1;proto=http"],
            "{}",
            r.uri
        );
    }
    drop(edge);

    // From a trusted proxy the chain is extended and the client address believed.
    let edge = Edge::start(&config(
        &mock.url(),
        &both_keys(),
        "trusted_proxies: [\"127.0.0.0/8\"]\n",
    ));
    let before = mock.requests().len();
    assert_chat_ok(
        edge.post(
            CHAT,
            chat_body("qwen"),
            Cred::Bearer(ALICE),
            &[("x-forwarded-for", "6.6.6.6")],
        )
        .await,
    )
    .await;
    let seen = mock.requests();
    assert_eq!(seen.len(), before + 1);
    let r = seen.last().unwrap();
    assert_eq!(r.header_all("x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
    assert_eq!(r.header_all("x-real-ip"), ["6.6.6.6"]);
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_key_never_appears_in_logs_admin_or_ledger() {
    let logs = capture_logs();
    let dir = TempDir::new("edge-security-traces");
    let mock = Mock::start(ok_reply);
    let extra = format!(
        "usage: {{}}\ntracing: {{mode: always, sqlite: {:?}}}\n",
        dir.join("traces.db").display().to_string()
    );
    let edge = Edge::start(&config(&mock.url(), &both_keys(), &extra));

    for cred in [Cred::Bearer(ALICE), Cred::XApiKey(ALICE)] {
        assert_chat_ok(edge.chat("qwen", cred).await).await;
    }
    assert_chat_ok(edge.chat("gpt", Cred::Bearer(BOB)).await).await;
    assert_chat_ok(edge.get("/raw/v1/files", Cred::Bearer(ALICE)).await).await;
    for cred in [Cred::Bearer(STRANGER), Cred::XApiKey(STRANGER)] {
        assert_error(edge.chat("qwen", cred).await, 401, "invalid_api_key").await;
    }
    // A call that fails upstream is logged (with its request id) at warn level.
    let resp = edge
        .post(
            CHAT,
            chat_body("gone"),
            Cred::Bearer(ALICE),
            &[("x-request-id", "edge-sec-log-probe")],
        )
        .await;
    assert_error(resp, 502, "upstream_unreachable").await;

    // The ledger counts by client id.
    let mut usage: Value;
    let counted = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let resp = edge.admin_get("/admin/usage?group_by=client", None).await;
            usage = serde_json::from_str(&assert_ok(resp).await).expect("usage JSON");
            let alice_ok = usage["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["client"] == "alice" && r["successes"] == 2);
            if alice_ok || Instant::now() >= deadline {
                break alice_ok;
            }
            tokio::time::sleep(ms(20)).await;
        }
    };
    assert!(counted, "alice's two calls are in the ledger: {usage}");
    let rows = usage["data"].as_array().unwrap();
    let mut clients: Vec<&str> = rows.iter().map(|r| r["client"].as_str().unwrap()).collect();
    clients.sort_unstable();
    assert_eq!(clients, ["alice", "bob"], "{usage}");
    let alice_row = rows.iter().find(|r| r["client"] == "alice").unwrap();
    assert_eq!(alice_row["total_tokens"], 240, "{usage}");
    let bob_row = rows.iter().find(|r| r["client"] == "bob").unwrap();
    assert_eq!(bob_row["requests"], 1, "{usage}");
    assert_eq!(bob_row["total_tokens"], 120, "{usage}");

    // Traces are written.
    let resp = edge
        .http
        .post(edge.proxy.admin_url("/admin/traces/flush"))
        .send()
        .await
        .expect("flush");
    let flushed: Value = serde_json::from_str(&assert_ok(resp).await).unwrap();
    assert!(flushed["written"].as_u64().unwrap() >= 3, "{flushed}");
    let traces = edge.admin_get("/admin/traces", None).await;
    assert_eq!(traces.status(), 200);

    let mut outputs = vec![("GET /admin/traces".to_string(), read_all(traces).await)];
    for path in [
        "/admin/keys",
        "/admin/usage?group_by=client",
        "/admin/usage?group_by=key",
        "/metrics",
    ] {
        let resp = edge.admin_get(path, None).await;
        outputs.push((format!("GET {path}"), read_all(resp).await));
    }
    for entry in std::fs::read_dir(dir.path()).expect("the trace store directory") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap_or_default();
        outputs.push((
            format!("{}", path.display()),
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
    assert!(
        outputs[0].1.contains("chatcmpl-sec"),
        "the traces list holds the calls: {}",
        outputs[0].1
    );
    for r in mock.requests() {
        assert_no_client_key(&r);
    }

    // The log capture works (the upstream failure above is logged with its request id)…
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(log.contains("edge-sec-log-probe"), "log capture is empty");
    outputs.push(("the proxy's log output".to_string(), log));
    // …and nothing holds a client key.
    for (what, text) in &outputs {
        for secret in [ALICE, BOB, STRANGER] {
            assert_absent(what, secret, text);
        }
    }
}
