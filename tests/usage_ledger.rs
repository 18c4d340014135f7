//! End-to-end tests of usage accounting: tokens counted per (client, upstream, key, model,
//! hour) from JSON bodies, OpenAI-style usage chunks and Anthropic stream events; the
//! `include_usage` chunk llm-edge asks for withheld from clients that did not ask; failures by
//! class; `/admin/usage`; and the JSON ledger file across graceful restarts and `kill -9`.
//!
//! In-process tests use the harness; persistence tests run the `llm-edge` binary.

mod common;

use bytes::Bytes;
use common::harness::{free_port, Proxy, TempDir};
use common::mock::{Mock, Recorded, Reply};
use common::{assert_error, client, within};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const EMBEDDINGS: &str = "/v1/embeddings";

/// Upstream secrets, `(variable, secret)`: distinctive enough to grep for.
const OPENAI_KEY: (&str, &str) = ("UL_OPENAI_KEY", "sk-ul-openai-4b8e2a7c90d1-Mq5t");
/// Listed as a bare secret: its id is derived from it.
const OPENAI_BARE_KEY: (&str, &str) = ("UL_OPENAI_BARE_KEY", "sk-ul-bare-71c3e9f0a2b5-Np6u");
const ANTHROPIC_KEY: (&str, &str) = ("UL_ANTHROPIC_KEY", "sk-ant-ul-0d5f8b2e6a13-Kr7v");
const SECRETS: [(&str, &str); 3] = [OPENAI_KEY, OPENAI_BARE_KEY, ANTHROPIC_KEY];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Upstreams (all served by the one mock at `mock`, except `d`, which is down) and models.
/// `usage` is the `usage:` section's value.
///
/// - `o` (openai, key `main`): `gpt`, `gpt-limited` (answers 429 with `Retry-After: 30`)
/// - `b` (openai, one bare key): `gpt-bare`
/// - `a` (anthropic, key `ant`): `claude`
/// - `v` (vllm, keyless): `local`, `spaced`, `crlf`, `nospace`, `usage-token` (streams in odd
///   but valid shapes), `emb`, `broken` (500), `limited` (429), `invalid` (400), `long-tail`
///   (usage followed by 40 KB of `prompt_logprobs`)
/// - `d` (vllm, nothing listening): `gone`
fn config(mock: &str, usage: &str) -> String {
    let down = free_port();
    format!(
        r#"
upstreams:
  o:
    kind: openai
    endpoints: ["{mock}"]
    keys: [{{id: main, key: os.environ/{o}}}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  b:
    kind: openai
    endpoints: ["{mock}"]
    keys: [os.environ/{b}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  a:
    kind: anthropic
    endpoints: ["{mock}"]
    keys: [{{id: ant, key: os.environ/{a}}}]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  v:
    kind: vllm
    endpoints: ["{mock}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
  d:
    kind: vllm
    endpoints: ["http://127.0.0.1:{down}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: gpt, upstream: o}}
  - {{name: gpt-limited, upstream: o}}
  - {{name: gpt-bare, upstream: b}}
  - {{name: claude, upstream: a}}
  - {{name: local, upstream: v}}
  - {{name: spaced, upstream: v}}
  - {{name: crlf, upstream: v}}
  - {{name: nospace, upstream: v}}
  - {{name: usage-token, upstream: v}}
  - {{name: usage-token-last, upstream: v}}
  - {{name: emb, upstream: v}}
  - {{name: broken, upstream: v}}
  - {{name: limited, upstream: v}}
  - {{name: invalid, upstream: v}}
  - {{name: long-tail, upstream: v}}
  - {{name: gone, upstream: d}}
usage: {usage}
"#,
        o = OPENAI_KEY.0,
        b = OPENAI_BARE_KEY.0,
        a = ANTHROPIC_KEY.0,
    )
}

fn key_env() -> Vec<(&'static str, &'static str)> {
    SECRETS.to_vec()
}

// ---------------------------------------------------------------------------------------------
// The mock upstream
// ---------------------------------------------------------------------------------------------

/// A non-streamed chat completion: 12 prompt tokens (4 cached), 7 completion tokens.
const CHAT_JSON: &str = r#"{"id":"chatcmpl-ul0","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Bonjour !","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}},"system_fingerprint":"fp_ul"}"#;

/// An OpenAI chat stream as the upstream sends it *with* `include_usage`: every chunk carries
/// `"usage":null`, and a usage-only chunk (9 + 3 tokens) precedes `[DONE]`.
const OPENAI_STREAM_WITH_USAGE: &str = concat!(
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Bonjour, \u{e9}t\u{e9} \\\"usage\\\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
);

/// The same stream as the upstream sends it *without* `include_usage`: no `usage` member, no
/// usage chunk. Written out in full: this is exactly what a client that did not ask must get.
const OPENAI_STREAM_WITHOUT_USAGE: &str = concat!(
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Bonjour, \u{e9}t\u{e9} \\\"usage\\\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-ul1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_ul\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// An Anthropic Messages stream: `message_start` reports 25 input tokens plus 10 read from and
/// 5 written to the cache (prompt 40, cached 10); `message_delta` reports 15 output tokens.
const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_ul1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\n",
    "data: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello \\\"usage\\\": {\\\"output_tokens\\\": 999}\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n\n",
);

/// An OpenAI-compatible server that writes JSON with Python's default separators
/// (`json.dumps`): `", "` and `": "`.
fn spaced_stream(include_usage: bool) -> String {
    let u = if include_usage {
        ", \"usage\": null"
    } else {
        ""
    };
    let mut s = format!(
        "data: {{\"id\": \"c-sp\", \"object\": \"chat.completion.chunk\", \"created\": 1700000000, \"model\": \"spaced\", \"choices\": [{{\"index\": 0, \"delta\": {{\"role\": \"assistant\", \"content\": \"hi\"}}, \"finish_reason\": null}}]{u}}}\n\n\
         data: {{\"id\": \"c-sp\", \"object\": \"chat.completion.chunk\", \"created\": 1700000000, \"model\": \"spaced\", \"choices\": [{{\"index\": 0, \"delta\": {{}}, \"finish_reason\": \"stop\"}}]{u}}}\n\n"
    );
    if include_usage {
        s.push_str("data: {\"id\": \"c-sp\", \"object\": \"chat.completion.chunk\", \"created\": 1700000000, \"model\": \"spaced\", \"choices\": [], \"usage\": {\"prompt_tokens\": 4, \"completion_tokens\": 1, \"total_tokens\": 5}}\n\n");
    }
    s.push_str("data: [DONE]\n\n");
    s
}

/// A server framing SSE events with CRLF (sse-starlette's default separator).
fn crlf_stream(include_usage: bool) -> String {
    let u = if include_usage { ",\"usage\":null" } else { "" };
    let mut s = format!(
        "data: {{\"id\":\"c-crlf\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"hi\"}},\"finish_reason\":null}}]{u}}}\r\n\r\n\
         data: {{\"id\":\"c-crlf\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{u}}}\r\n\r\n"
    );
    if include_usage {
        s.push_str("data: {\"id\":\"c-crlf\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":6,\"completion_tokens\":2,\"total_tokens\":8}}\r\n\r\n");
    }
    s.push_str("data: [DONE]\r\n\r\n");
    s
}

/// A server writing `data:` without the optional space (valid SSE; e.g. Spring's encoder).
fn nospace_stream(include_usage: bool) -> String {
    let u = if include_usage { ",\"usage\":null" } else { "" };
    let mut s = format!(
        "data:{{\"id\":\"c-ns\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"hi\"}},\"finish_reason\":null}}]{u}}}\n\n\
         data:{{\"id\":\"c-ns\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{u}}}\n\n"
    );
    if include_usage {
        s.push_str("data:{\"id\":\"c-ns\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n");
    }
    s.push_str("data:[DONE]\n\n");
    s
}

/// A stream in which the model wrote the word `usage` as one token (`"content":"usage"`).
/// `nulls`: every chunk carries `"usage":null` when usage was asked for (OpenAI); without,
/// chunks have no `usage` member at all and the content comes last (a minimal server).
fn usage_token_stream(include_usage: bool, nulls: bool) -> String {
    let u = if include_usage && nulls {
        ",\"usage\":null"
    } else {
        ""
    };
    let mut s = String::new();
    for (content, finish) in [
        ("usage", "null"),
        (":", "null"),
        (" llm-edge -c FILE", "\"stop\""),
    ] {
        s.push_str(&format!(
            "data: {{\"id\":\"c-ut\",\"choices\":[{{\"index\":0,\"finish_reason\":{finish},\"delta\":{{\"content\":\"{content}\"}}}}]{u}}}\n\n"
        ));
    }
    if include_usage {
        s.push_str("data: {\"id\":\"c-ut\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n");
    }
    s.push_str("data: [DONE]\n\n");
    s
}

/// A vLLM chat completion as vLLM orders its fields: `usage` (30 + 2 tokens), then
/// `prompt_logprobs` (here ~40 KB, as with `prompt_logprobs` requested on a long prompt).
fn long_tail_json() -> String {
    let entries: Vec<String> = (0..800)
        .map(|i| {
            format!(
                "{{\"{}\":{{\"logprob\":-1.25,\"rank\":1,\"decoded_token\":\"t{i}\"}}}}",
                1000 + i
            )
        })
        .collect();
    format!(
        "{{\"id\":\"chatcmpl-lt\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"long-tail\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"ok\"}},\"logprobs\":null,\"finish_reason\":\"stop\",\"stop_reason\":null}}],\"usage\":{{\"prompt_tokens\":30,\"total_tokens\":32,\"completion_tokens\":2,\"prompt_tokens_details\":null}},\"prompt_logprobs\":[null,{}],\"kv_transfer_params\":null}}",
        entries.join(",")
    )
}

/// An embeddings answer for `n` inputs: 5 prompt tokens per input, usage once for the batch.
fn embeddings_json(n: usize) -> String {
    let data: Vec<String> = (0..n)
        .map(|i| {
            format!("{{\"object\":\"embedding\",\"index\":{i},\"embedding\":[0.0{i},-0.5,0.25]}}")
        })
        .collect();
    format!(
        "{{\"object\":\"list\",\"data\":[{}],\"model\":\"emb\",\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{}}}}}",
        data.join(","),
        5 * n,
        5 * n
    )
}

/// Splits `s` into 29-byte chunks, 1 ms apart: event boundaries (and `"usage":null`) fall
/// inside chunks.
fn ragged(s: &str) -> Vec<(Duration, Bytes)> {
    s.as_bytes()
        .chunks(29)
        .map(|c| (ms(1), Bytes::copy_from_slice(c)))
        .collect()
}

/// Whether the request asked for the usage chunk.
fn wants_usage(body: &Value) -> bool {
    body["stream_options"]["include_usage"] == true
}

/// The mock upstream: answers by path and model like the real servers would.
fn upstream(r: &Recorded) -> Reply {
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or_default();
    let stream = body["stream"] == true;
    match (r.uri.as_str(), model) {
        (EMBEDDINGS, _) => {
            let n = body["input"].as_array().map_or(1, Vec::len);
            Reply::json(200, embeddings_json(n))
        }
        (MESSAGES, _) => Reply::sse(ragged(ANTHROPIC_STREAM)),
        (_, "broken") => Reply::json(
            500,
            r#"{"error":{"message":"CUDA out of memory","type":"InternalServerError","code":500}}"#,
        ),
        (_, "limited") => Reply::json(
            429,
            r#"{"error":{"message":"too many requests","type":"rate_limit","code":429}}"#,
        ),
        (_, "gpt-limited") => Reply::json(
            429,
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
        )
        .header("retry-after", "30"),
        (_, "invalid") => Reply::json(
            400,
            r#"{"error":{"message":"max_tokens is too large","type":"BadRequestError","code":400}}"#,
        ),
        (_, "spaced") => Reply::sse(ragged(&spaced_stream(wants_usage(&body)))),
        (_, "crlf") => Reply::sse(ragged(&crlf_stream(wants_usage(&body)))),
        (_, "nospace") => Reply::sse(ragged(&nospace_stream(wants_usage(&body)))),
        (_, "usage-token") => Reply::sse(ragged(&usage_token_stream(wants_usage(&body), true))),
        (_, "usage-token-last") => {
            Reply::sse(ragged(&usage_token_stream(wants_usage(&body), false)))
        }
        (_, "long-tail") => Reply::json(200, long_tail_json()),
        _ if stream && wants_usage(&body) => Reply::sse(ragged(OPENAI_STREAM_WITH_USAGE)),
        _ if stream => Reply::sse(ragged(OPENAI_STREAM_WITHOUT_USAGE)),
        _ => Reply::json(200, CHAT_JSON),
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to llm-edge
// ---------------------------------------------------------------------------------------------

/// An llm-edge listening at `base` (in-process or a child process) and one HTTP client.
struct Edge {
    base: String,
    admin: String,
    http: reqwest::Client,
}

impl Edge {
    fn new((base, admin): (String, String)) -> Self {
        Self {
            base,
            admin,
            http: client(),
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        let req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("anthropic-version", "2023-06-01")
            .body(body);
        within(
            Duration::from_secs(10),
            "a request through llm-edge",
            async { req.send().await.expect("request through llm-edge") },
        )
        .await
    }

    /// Posts and reads the whole answer: status and body.
    async fn call(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Bytes) {
        let resp = self.post(path, body).await;
        let status = resp.status().as_u16();
        let body = within(Duration::from_secs(10), "reading an answer", resp.bytes())
            .await
            .expect("answer body");
        (status, body)
    }

    /// A chat call that must succeed with the mock's `CHAT_JSON`, unchanged.
    async fn chat_ok(&self, model: &str) {
        let (status, body) = self.call(CHAT, chat_body(model, "")).await;
        assert_eq!(status, 200, "{model}: {}", String::from_utf8_lossy(&body));
        assert_eq!(body, CHAT_JSON.as_bytes(), "{model}: the upstream's body");
    }

    /// `GET /admin/usage?<query>`: status, headers + body as text (for secret greps), and the
    /// body parsed.
    async fn usage_raw(&self, query: &str) -> (u16, String, Value) {
        let resp = self
            .http
            .get(self.admin_url(&format!("/admin/usage?{query}")))
            .send()
            .await
            .expect("GET /admin/usage");
        let status = resp.status().as_u16();
        let mut text = String::new();
        for (k, v) in resp.headers() {
            text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        let body = resp.bytes().await.expect("/admin/usage body");
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&body));
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("/admin/usage is not JSON ({e}): {text}"));
        (status, text, v)
    }

    /// `GET /admin/usage?<query>`, which must answer 200 with the list shape.
    async fn usage(&self, query: &str) -> Value {
        let (status, text, v) = self.usage_raw(query).await;
        assert_eq!(status, 200, "GET /admin/usage?{query}: {text}");
        assert_eq!(v["object"], "list", "{v}");
        assert!(v["data"].is_array(), "{v}");
        v
    }

    /// `/admin/usage?group_by=<g>` once it counts `requests` calls in all (the ledger records a
    /// call just after its answer went out), then re-read a moment later so that anything
    /// counted on top shows.
    async fn usage_settled(&self, group_by: &str, requests: u64) -> Value {
        let query = format!("group_by={group_by}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.usage(&query).await;
            if total(&v, "requests") >= requests {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the ledger did not reach {requests} requests within 5 s: {v}"
            );
            tokio::time::sleep(ms(10)).await;
        }
        tokio::time::sleep(ms(50)).await;
        self.usage(&query).await
    }
}

fn chat_body(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say bonjour"}}]{extra}}}"#
    )
}

/// The sum of a counter over every row of an `/admin/usage` answer.
fn total(v: &Value, field: &str) -> u64 {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {r}"))
        })
        .sum()
}

/// The row of group `name` in an `/admin/usage` answer.
fn row<'a>(v: &'a Value, name: &str) -> &'a Value {
    let g = v["group_by"].as_str().unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[g] == name)
        .unwrap_or_else(|| panic!("no {g} {name:?} in {v}"))
}

/// The groups of an `/admin/usage` answer, sorted.
fn groups(v: &Value) -> Vec<String> {
    let g = v["group_by"].as_str().unwrap();
    let mut out: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[g].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// An `/admin/usage` row as the tests expect it in full.
#[allow(clippy::too_many_arguments)]
fn expect_row(
    group_by: &str,
    name: &str,
    requests: u64,
    successes: u64,
    failures: Value,
    streamed: u64,
    (prompt, completion, total, cached): (u64, u64, u64, u64),
) -> Value {
    let mut v = json!({
        "requests": requests,
        "successes": successes,
        "failures": failures,
        "streamed": streamed,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cached_tokens": cached,
    });
    v[group_by] = json!(name);
    v
}

/// Asserts that no upstream secret, nor its hidden middle, occurs in `text`.
fn assert_no_secret(what: &str, text: &str) {
    for (var, secret) in SECRETS {
        let hidden = &secret[3..secret.len() - 4];
        assert!(
            !text.contains(secret) && !text.contains(hidden),
            "{what} leaks the secret in {var}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// In-process tests
// ---------------------------------------------------------------------------------------------

fn start_in_process(mock: &Mock, usage: &str) -> (Proxy, Edge) {
    let proxy = Proxy::start_with_env(&config(&mock.url(), usage), &key_env());
    let edge = Edge::new((proxy.url(""), proxy.admin_url("")));
    (proxy, edge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_chat_tokens_are_counted_per_model_and_key() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");

    for _ in 0..3 {
        edge.chat_ok("gpt").await;
    }
    edge.chat_ok("local").await;
    assert_eq!(mock.requests().len(), 4);

    let by_model = edge.usage_settled("model", 4).await;
    assert_eq!(by_model["group_by"], "model");
    assert_eq!(
        by_model["data"],
        json!([
            expect_row("model", "gpt", 3, 3, json!({}), 0, (36, 21, 57, 12)),
            expect_row("model", "local", 1, 1, json!({}), 0, (12, 7, 19, 4)),
        ]),
        "{by_model}"
    );

    // Per key: `upstream/key id`, `-` for the keyless upstream.
    let by_key = edge.usage("group_by=key").await;
    assert_eq!(by_key["group_by"], "key");
    assert_eq!(
        by_key["data"],
        json!([
            expect_row("key", "o/main", 3, 3, json!({}), 0, (36, 21, 57, 12)),
            expect_row("key", "v/-", 1, 1, json!({}), 0, (12, 7, 19, 4)),
        ]),
        "{by_key}"
    );
    // The default grouping is by key.
    assert_eq!(edge.usage("").await, by_key);

    let by_upstream = edge.usage("group_by=upstream").await;
    assert_eq!(groups(&by_upstream), ["o", "v"], "{by_upstream}");
    assert_eq!(row(&by_upstream, "o")["prompt_tokens"], 36);
    let by_client = edge.usage("group_by=client").await;
    assert_eq!(
        by_client["data"],
        json!([expect_row(
            "client",
            "anonymous",
            4,
            4,
            json!({}),
            0,
            (48, 28, 76, 16)
        )]),
        "{by_client}"
    );

    // `since`: this hour's rows count from any moment in it; none start after the next hour.
    let now = unix_now();
    let recent = edge
        .usage(&format!("group_by=model&since={}", now - 5))
        .await;
    assert_eq!(recent["data"], by_model["data"]);
    let later = edge
        .usage(&format!(
            "group_by=model&since={}",
            now / 3600 * 3600 + 3600
        ))
        .await;
    assert_eq!(later["data"], json!([]), "{later}");

    // Bad queries are the caller's fault.
    for q in ["group_by=nope", "since=yesterday", "colour=blue"] {
        let (status, text, v) = edge.usage_raw(q).await;
        assert_eq!(status, 400, "{q}: {text}");
        common::assert_error_shape(&v, "bad_request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_usage_is_400_without_a_usage_section() {
    let mock = Mock::start(upstream);
    let yaml = config(&mock.url(), "{}").replace("usage: {}\n", "");
    let proxy = Proxy::start_with_env(&yaml, &key_env());
    let edge = Edge::new((proxy.url(""), proxy.admin_url("")));
    edge.chat_ok("gpt").await;
    let resp = edge
        .http
        .get(edge.admin_url("/admin/usage"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "bad_request").await;

    // Without accounting, a stream is forwarded as the client sent it (nothing injected).
    let body = r#"{"model":"gpt","stream":true,"messages":[]}"#;
    let (status, got) = edge.call(CHAT, body).await;
    assert_eq!(status, 200);
    assert_eq!(got, OPENAI_STREAM_WITHOUT_USAGE.as_bytes());
    assert_eq!(mock.requests()[1].body_str(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_include_usage_is_counted_and_the_usage_chunk_withheld_byte_for_byte() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{inject_include_usage: true}");

    // 1. The client did not ask: llm-edge asks for it, counts it, and withholds it.
    let sent =
        r#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"Say bonjour"}]}"#;
    let resp = edge.post(CHAT, sent).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let got = resp.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        OPENAI_STREAM_WITHOUT_USAGE,
        "the client gets exactly the stream it would get without include_usage"
    );
    let upstream_body = mock.requests()[0].body.clone();
    assert_eq!(
        String::from_utf8_lossy(&upstream_body),
        r#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"Say bonjour"}],"stream_options":{"include_usage":true}}"#,
        "only stream_options added; every other byte as the client sent it"
    );

    // 2. The client asked itself: the request and the stream pass untouched, usage chunk included.
    let asked = r#"{"model":"gpt","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say bonjour"}]}"#;
    let (status, got) = edge.call(CHAT, asked).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), OPENAI_STREAM_WITH_USAGE);
    assert_eq!(mock.requests()[1].body_str(), asked);

    // 3. The client said no: its choice is forwarded and respected (nothing to count).
    let declined =
        r#"{"model":"gpt","stream":true,"stream_options":{"include_usage":false},"messages":[]}"#;
    let (status, got) = edge.call(CHAT, declined).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), OPENAI_STREAM_WITHOUT_USAGE);
    assert_eq!(mock.requests()[2].body_str(), declined);

    // 4. Non-streamed calls get no stream_options.
    edge.chat_ok("gpt").await;
    assert_eq!(mock.requests()[3].body_str(), chat_body("gpt", ""));

    let by_model = edge.usage_settled("model", 4).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row(
            "model",
            "gpt",
            4,
            4,
            json!({}),
            3,
            (9 + 9 + 12, 3 + 3 + 7, 12 + 12 + 19, 4)
        )]),
        "{by_model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_include_usage_false_forwards_streams_untouched() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{inject_include_usage: false}");
    let sent = r#"{"model":"gpt","stream":true,"messages":[]}"#;
    let (status, got) = edge.call(CHAT, sent).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), OPENAI_STREAM_WITHOUT_USAGE);
    assert_eq!(mock.only_request().body_str(), sent);
    let by_model = edge.usage_settled("model", 1).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row("model", "gpt", 1, 1, json!({}), 1, (0, 0, 0, 0))]),
        "counted, without tokens: {by_model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_stream_prompt_from_message_start_completion_from_message_delta() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");

    let sent = r#"{"model":"claude","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
    let resp = edge.post(MESSAGES, sent).await;
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        ANTHROPIC_STREAM,
        "the stream passes unchanged"
    );
    let r = mock.only_request();
    assert_eq!(r.uri, MESSAGES);
    assert_eq!(
        r.body_str(),
        sent,
        "nothing injected for an anthropic upstream"
    );
    assert_eq!(r.header("x-api-key"), Some(ANTHROPIC_KEY.1));

    let by_key = edge.usage_settled("key", 1).await;
    // Prompt = input + cache reads + cache writes (OpenAI's meaning); the text that merely
    // mentions "usage" in a content delta is not usage.
    assert_eq!(
        by_key["data"],
        json!([expect_row(
            "key",
            "a/ant",
            1,
            1,
            json!({}),
            1,
            (40, 15, 55, 10)
        )]),
        "{by_key}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_batch_of_ten_is_one_request_with_the_batch_usage() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");

    let inputs: Vec<String> = (0..10).map(|i| format!("\"document {i}\"")).collect();
    let sent = format!(
        r#"{{"model":"emb","input":[{}],"encoding_format":"float"}}"#,
        inputs.join(",")
    );
    let (status, got) = edge.call(EMBEDDINGS, sent.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(got, embeddings_json(10).as_bytes());
    assert_eq!(mock.only_request().body_str(), sent);

    let by_model = edge.usage_settled("model", 1).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row(
            "model",
            "emb",
            1,
            1,
            json!({}),
            0,
            (50, 0, 50, 0)
        )]),
        "{by_model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_class() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");

    for (model, status) in [("broken", 500), ("limited", 429), ("invalid", 400)] {
        let (got, body) = edge.call(CHAT, chat_body(model, "")).await;
        assert_eq!(got, status, "{model}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(mock.requests().len(), 3, "single replica: no retries");
    let (status, body) = edge.call(CHAT, chat_body("broken", "")).await;
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    // Nothing listens behind `gone`: the call fails with llm-edge's own error, counted by its code.
    let resp = edge.post(CHAT, chat_body("gone", "")).await;
    let err = assert_error(resp, 502, "upstream_unreachable").await;
    let gone_code = err["error"]["code"].as_str().unwrap().to_string();
    // An unknown model never reached an upstream: not counted.
    let resp = edge.post(CHAT, chat_body("nope", "")).await;
    assert_error(resp, 404, "model_not_found").await;
    edge.chat_ok("local").await;

    let by_model = edge.usage_settled("model", 6).await;
    let zero = (0, 0, 0, 0);
    assert_eq!(
        by_model["data"],
        json!([
            expect_row("model", "broken", 2, 0, json!({"upstream_5xx": 2}), 0, zero),
            expect_row("model", "gone", 1, 0, json!({ gone_code: 1 }), 0, zero),
            expect_row(
                "model",
                "invalid",
                1,
                0,
                json!({"upstream_4xx": 1}),
                0,
                zero
            ),
            expect_row(
                "model",
                "limited",
                1,
                0,
                json!({"upstream_rate_limited": 1}),
                0,
                zero
            ),
            expect_row("model", "local", 1, 1, json!({}), 0, (12, 7, 19, 4)),
        ]),
        "{by_model}"
    );
    let by_upstream = edge.usage("group_by=upstream").await;
    assert_eq!(groups(&by_upstream), ["d", "v"], "{by_upstream}");
    assert_eq!(row(&by_upstream, "v")["requests"], 5);
    assert_eq!(
        row(&by_upstream, "v")["failures"],
        json!({"upstream_5xx": 2, "upstream_4xx": 1, "upstream_rate_limited": 1})
    );
}

/// After a 429, a one-key upstream cools down and llm-edge answers the next call itself: that
/// call never reached the upstream, so it is not charged to it (nor to a key it never used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_answered_429_is_not_counted_as_an_upstream_call() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");

    let (status, _) = edge.call(CHAT, chat_body("gpt-limited", "")).await;
    assert_eq!(status, 429, "the upstream's 429 passes through");
    let resp = edge.post(CHAT, chat_body("gpt-limited", "")).await;
    assert_error(resp, 429, "upstream_rate_limited").await;
    assert_eq!(
        mock.requests().len(),
        1,
        "the second call never left llm-edge"
    );

    let by_key = edge.usage_settled("key", 1).await;
    assert_eq!(
        by_key["data"],
        json!([expect_row(
            "key",
            "o/main",
            1,
            0,
            json!({"upstream_rate_limited": 1}),
            0,
            (0, 0, 0, 0)
        )]),
        "one call reached upstream o, with key main: {by_key}"
    );
}

/// Servers that write JSON with spaces (Python's `json.dumps` defaults) get the same treatment:
/// tokens counted, usage chunk withheld, `"usage": null` removed, every other byte kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_in_spaced_json_is_withheld_too() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");
    let (status, got) = edge
        .call(CHAT, r#"{"model":"spaced","stream":true,"messages":[]}"#)
        .await;
    assert_eq!(status, 200);
    assert!(mock
        .only_request()
        .body_str()
        .contains(r#""stream_options":{"include_usage":true}"#));
    let by_model = edge.usage_settled("model", 1).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row(
            "model",
            "spaced",
            1,
            1,
            json!({}),
            1,
            (4, 1, 5, 0)
        )]),
        "{by_model}"
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        spaced_stream(false),
        "the client did not ask for the usage chunk"
    );
}

/// SSE allows CRLF line ends (sse-starlette, used by llama-cpp-python's server, writes them):
/// the usage chunk is found and withheld, and the other events keep their framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_framed_stream_is_counted_and_stripped_byte_for_byte() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");
    let (status, got) = edge
        .call(CHAT, r#"{"model":"crlf","stream":true,"messages":[]}"#)
        .await;
    assert_eq!(status, 200);
    let by_model = edge.usage_settled("model", 1).await;
    let mut problems = Vec::new();
    let want = json!([expect_row(
        "model",
        "crlf",
        1,
        1,
        json!({}),
        1,
        (6, 2, 8, 0)
    )]);
    if by_model["data"] != want {
        problems.push(format!(
            "the usage chunk of a CRLF stream is not counted:\n got: {}\nwant: {want}",
            by_model["data"]
        ));
    }
    if got != crlf_stream(false).as_bytes() {
        problems.push(format!(
            "the client does not get the CRLF stream without usage, byte for byte:\n got: {:?}\nwant: {:?}",
            String::from_utf8_lossy(&got),
            crlf_stream(false)
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `data:` without a space is valid SSE: the events llm-edge edits keep the upstream's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_lines_without_a_space_keep_their_bytes() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");
    let (status, got) = edge
        .call(CHAT, r#"{"model":"nospace","stream":true,"messages":[]}"#)
        .await;
    assert_eq!(status, 200);
    let by_model = edge.usage_settled("model", 1).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row(
            "model",
            "nospace",
            1,
            1,
            json!({}),
            1,
            (3, 2, 5, 0)
        )]),
        "{by_model}"
    );
    assert_eq!(String::from_utf8_lossy(&got), nospace_stream(false));
}

/// A model may write the word `usage` as a token: that chunk is forwarded like every other
/// (losing only its own `"usage":null`), and the call is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_spelled_usage_does_not_confuse_the_stripper() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");
    let mut problems = Vec::new();
    for (model, nulls) in [("usage-token", true), ("usage-token-last", false)] {
        let (status, got) = edge
            .call(
                CHAT,
                format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#),
            )
            .await;
        assert_eq!(status, 200);
        let want = usage_token_stream(false, nulls);
        if got != want.as_bytes() {
            problems.push(format!(
                "{model}: the client stream differs from the upstream's without usage:\n got: {:?}\nwant: {want:?}",
                String::from_utf8_lossy(&got)
            ));
        }
    }
    let by_model = edge.usage_settled("model", 2).await;
    let want = json!([
        expect_row("model", "usage-token", 1, 1, json!({}), 1, (7, 3, 10, 0)),
        expect_row(
            "model",
            "usage-token-last",
            1,
            1,
            json!({}),
            1,
            (7, 3, 10, 0)
        ),
    ]);
    if by_model["data"] != want {
        problems.push(format!("ledger:\n got: {}\nwant: {want}", by_model["data"]));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// vLLM puts `prompt_logprobs` (and, when asked, `prompt_token_ids`) after `usage`; with a
/// long prompt that tail is tens of kilobytes. The usage is still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_followed_by_a_long_vllm_tail_is_counted() {
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(&mock, "{}");
    let body = long_tail_json();
    assert!(body.len() > 40_000, "{}", body.len());
    let (status, got) = edge.call(CHAT, chat_body("long-tail", "")).await;
    assert_eq!(status, 200);
    assert_eq!(got, body.as_bytes());
    let by_model = edge.usage_settled("model", 1).await;
    assert_eq!(
        by_model["data"],
        json!([expect_row(
            "model",
            "long-tail",
            1,
            1,
            json!({}),
            0,
            (30, 2, 32, 0)
        )]),
        "{by_model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_ledger_file_or_admin_usage() {
    let dir = TempDir::new("ledger-secrets");
    let ledger = dir.join("usage.json");
    let mock = Mock::start(upstream);
    let (_proxy, edge) = start_in_process(
        &mock,
        &format!(
            "{{ledger: {:?}, flush_interval: 20ms}}",
            ledger.display().to_string()
        ),
    );

    edge.chat_ok("gpt").await;
    edge.chat_ok("gpt-bare").await;
    let (status, _) = edge
        .call(
            MESSAGES,
            r#"{"model":"claude","max_tokens":8,"stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = edge.call(CHAT, chat_body("gpt-limited", "")).await;
    assert_eq!(status, 429);
    let by_key = edge.usage_settled("key", 4).await;
    let derived = derived_id_in(&by_key);
    assert!(derived.starts_with("key-"), "a derived id: {by_key}");
    let bare_id = format!("b/{derived}");
    assert_eq!(
        groups(&by_key),
        ["a/ant", bare_id.as_str(), "o/main"],
        "{by_key}"
    );

    let mut outputs = Vec::new();
    for q in [
        "",
        "group_by=key",
        "group_by=model",
        "group_by=upstream",
        "group_by=client",
        "group_by=nope",
    ] {
        let (_, text, _) = edge.usage_raw(q).await;
        outputs.push((format!("GET /admin/usage?{q}"), text));
    }
    let file = wait_for_ledger(&ledger, 4).await;
    outputs.push(("the ledger file".into(), file));
    for (what, text) in &outputs {
        assert_no_secret(what, text);
    }
}

/// The derived id (`key-…`) of the bare key in an `/admin/usage?group_by=key` answer.
fn derived_id_in(by_key: &Value) -> String {
    groups(by_key)
        .into_iter()
        .find_map(|g| g.strip_prefix("b/").map(str::to_string))
        .unwrap_or_else(|| panic!("no row of upstream b: {by_key}"))
}

/// Waits until the ledger file counts `requests` calls; returns its text.
async fn wait_for_ledger(path: &Path, requests: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if ledger_requests(&parse_ledger(&text)) >= requests {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not count {requests} requests within 5 s",
            path.display()
        );
        tokio::time::sleep(ms(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger file
// ---------------------------------------------------------------------------------------------

const ROW_FIELDS: [&str; 13] = [
    "cached_tokens",
    "client",
    "completion_tokens",
    "failures",
    "hour",
    "key_id",
    "model",
    "prompt_tokens",
    "requests",
    "streamed",
    "successes",
    "total_tokens",
    "upstream",
];

/// Parses a ledger file, checking its format: `{"version":1,"rows":[…]}`, each row with exactly
/// the documented fields and consistent counts.
fn parse_ledger(text: &str) -> Value {
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the ledger file is not JSON ({e}): {text:?}"));
    let top: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, BTreeSet::from(["rows", "version"]), "{text}");
    assert_eq!(v["version"], 1, "{text}");
    for r in v["rows"].as_array().expect("rows is a list") {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(ROW_FIELDS), "row fields: {r}");
        for f in ["client", "upstream", "key_id", "model"] {
            assert!(r[f].is_string(), "{f}: {r}");
        }
        let hour = r["hour"].as_u64().expect("hour");
        assert_eq!(hour % 3600, 0, "hour starts an hour: {r}");
        assert!(hour <= unix_now() && hour + 7200 > unix_now(), "{r}");
        let n = |f: &str| r[f].as_u64().unwrap_or_else(|| panic!("{f}: {r}"));
        let failed: u64 = r["failures"]
            .as_object()
            .expect("failures is an object")
            .values()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(n("successes") + failed, n("requests"), "{r}");
        assert_eq!(
            n("prompt_tokens") + n("completion_tokens"),
            n("total_tokens"),
            "{r}"
        );
    }
    v
}

fn ledger_requests(v: &Value) -> u64 {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum()
}

/// The ledger file's rows summed by model: `model → (requests, successes, prompt, completion)`.
fn ledger_by_model(v: &Value) -> std::collections::BTreeMap<String, (u64, u64, u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for r in v["rows"].as_array().unwrap() {
        let e = out
            .entry(r["model"].as_str().unwrap().to_string())
            .or_insert((0, 0, 0, 0));
        e.0 += r["requests"].as_u64().unwrap();
        e.1 += r["successes"].as_u64().unwrap();
        e.2 += r["prompt_tokens"].as_u64().unwrap();
        e.3 += r["completion_tokens"].as_u64().unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// llm-edge as a child process
// ---------------------------------------------------------------------------------------------

/// A running `llm-edge -c <config>` child; killed (SIGKILL) if still running when dropped.
struct EdgeProcess {
    child: Child,
    port: u16,
    admin_port: u16,
}

impl EdgeProcess {
    /// Writes a config (fresh port, per-run pid file and upgrade socket, `yaml` after) into
    /// `dir` and starts the binary on it, logging to `dir/stderr-<run>.log`. Returns once it
    /// accepts connections.
    fn start(dir: &TempDir, run: usize, yaml: &str) -> Self {
        let port = free_port();
        let admin_port = free_port();
        let conf = dir.join(&format!("llm-edge-{run}.yaml"));
        let text = format!(
            "listen: [\"127.0.0.1:{port}\"]\nadmin: {{listen: \"127.0.0.1:{admin_port}\"}}\nauth: {{mode: open}}\nshutdown: {{grace_period: 0s}}\nserver: {{threads: 2, pid_file: {:?}, upgrade_sock: {:?}}}\n{yaml}",
            dir.join(&format!("pid-{run}")).display().to_string(),
            dir.join(&format!("upgrade-{run}.sock")).display().to_string(),
        );
        std::fs::write(&conf, text).unwrap();
        let log = std::fs::File::create(dir.join(&format!("stderr-{run}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llm-edge"))
            .arg("-c")
            .arg(&conf)
            .env("LLM_EDGE_LOG", "warn")
            .envs(key_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn llm-edge");
        let mut me = Self {
            child,
            port,
            admin_port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
        // The admin listener is a separate service: wait for both.
        while std::net::TcpStream::connect_timeout(&addr, ms(100)).is_err()
            || std::net::TcpStream::connect_timeout(&admin, ms(100)).is_err()
        {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!(
                    "llm-edge exited during start-up ({status}):\n{}",
                    read_log(dir, run)
                );
            }
            assert!(
                Instant::now() < deadline,
                "llm-edge did not accept connections within 10 s:\n{}",
                read_log(dir, run)
            );
            std::thread::sleep(ms(5));
        }
        me
    }

    fn base(&self) -> (String, String) {
        (
            format!("http://127.0.0.1:{}", self.port),
            format!("http://127.0.0.1:{}", self.admin_port),
        )
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(ms(5));
        }
    }

    /// SIGTERM (graceful shutdown); returns the exit status.
    fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {pid}");
        self.wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("llm-edge {pid} did not exit within 15 s of SIGTERM"))
    }

    /// SIGKILL, and reap it.
    fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_log(dir: &TempDir, run: usize) -> String {
    std::fs::read_to_string(dir.join(&format!("stderr-{run}.log"))).unwrap_or_default()
}

fn ledger_usage(ledger: &Path, flush: &str) -> String {
    format!(
        "{{ledger: {:?}, flush_interval: {flush}}}",
        ledger.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_survives_a_graceful_restart() {
    let dir = TempDir::new("ledger-restart");
    let ledger = dir.join("usage.json");
    let mock = Mock::start(upstream);
    let yaml = config(&mock.url(), &ledger_usage(&ledger, "100ms"));

    // Run 1: three non-streamed calls, one stream, one upstream 500.
    let proc1 = EdgeProcess::start(&dir, 1, &yaml);
    let edge = Edge::new(proc1.base());
    for _ in 0..3 {
        edge.chat_ok("gpt").await;
    }
    let (status, got) = edge
        .call(CHAT, r#"{"model":"gpt","stream":true,"messages":[]}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got, OPENAI_STREAM_WITHOUT_USAGE.as_bytes());
    let (status, _) = edge.call(CHAT, chat_body("broken", "")).await;
    assert_eq!(status, 500);
    let before = edge.usage_settled("model", 5).await;
    assert_eq!(
        before["data"],
        json!([
            expect_row(
                "model",
                "broken",
                1,
                0,
                json!({"upstream_5xx": 1}),
                0,
                (0, 0, 0, 0)
            ),
            expect_row("model", "gpt", 4, 4, json!({}), 1, (45, 24, 69, 12)),
        ]),
        "{before}"
    );
    let status = proc1.terminate();
    assert!(
        status.success(),
        "graceful exit: {status}\n{}",
        read_log(&dir, 1)
    );

    let text = std::fs::read_to_string(&ledger).expect("the ledger file after SIGTERM");
    let file = parse_ledger(&text);
    assert_eq!(ledger_requests(&file), 5, "{text}");
    assert_eq!(ledger_by_model(&file)["gpt"], (4, 4, 45, 24), "{text}");
    assert_no_secret("the ledger file", &text);
    assert!(
        !dir.join("usage.tmp").exists(),
        "no temp file left after a clean save"
    );

    // Run 2 on the same file: the counts are back, and new calls add to them.
    let proc2 = EdgeProcess::start(&dir, 2, &yaml);
    let edge = Edge::new(proc2.base());
    let (_, text_after, after) = edge.usage_raw("group_by=model").await;
    assert_eq!(after["data"], before["data"], "loaded as saved");
    assert_no_secret("/admin/usage", &text_after);
    edge.chat_ok("gpt").await;
    let (status, _) = edge
        .call(
            MESSAGES,
            r#"{"model":"claude","max_tokens":8,"stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200);
    let by_model = edge.usage_settled("model", 7).await;
    assert_eq!(
        by_model["data"],
        json!([
            expect_row(
                "model",
                "broken",
                1,
                0,
                json!({"upstream_5xx": 1}),
                0,
                (0, 0, 0, 0)
            ),
            expect_row("model", "claude", 1, 1, json!({}), 1, (40, 15, 55, 10)),
            expect_row("model", "gpt", 5, 5, json!({}), 1, (57, 31, 88, 16)),
        ]),
        "{by_model}"
    );
    let by_key = edge.usage("group_by=key").await;
    assert_eq!(groups(&by_key), ["a/ant", "o/main", "v/-"], "{by_key}");
    let status = proc2.terminate();
    assert!(
        status.success(),
        "graceful exit: {status}\n{}",
        read_log(&dir, 2)
    );
    let text = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(ledger_requests(&parse_ledger(&text)), 7, "{text}");
    assert_no_secret("the ledger file", &text);
    for run in [1, 2] {
        assert_no_secret("llm-edge's log", &read_log(&dir, run));
    }
}

/// With a long flush interval nothing is written while running; SIGTERM still saves it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_saves_what_the_debounce_has_not_yet_written() {
    let dir = TempDir::new("ledger-shutdown");
    let ledger = dir.join("usage.json");
    let mock = Mock::start(upstream);
    let yaml = config(&mock.url(), &ledger_usage(&ledger, "1h"));
    let proc1 = EdgeProcess::start(&dir, 1, &yaml);
    let edge = Edge::new(proc1.base());
    edge.chat_ok("gpt").await;
    edge.chat_ok("local").await;
    edge.usage_settled("model", 2).await;
    assert!(!ledger.exists(), "not written before the flush interval");
    let status = proc1.terminate();
    assert!(
        status.success(),
        "graceful exit: {status}\n{}",
        read_log(&dir, 1)
    );
    let text = std::fs::read_to_string(&ledger).expect("the ledger saved at shutdown");
    let file = parse_ledger(&text);
    assert_eq!(ledger_requests(&file), 2, "{text}");
    assert_eq!(ledger_by_model(&file)["local"], (1, 1, 12, 7));
}

/// A tiny PRNG (xorshift), seeded from the clock and printed, for kill timings.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_file_stays_readable_and_never_goes_down_across_kill_9() {
    let dir = TempDir::new("ledger-kill");
    let ledger = dir.join("usage.json");
    let mock = Mock::start(upstream);
    // Saves as often as llm-edge allows, so that kills land mid-save.
    let yaml = config(&mock.url(), &ledger_usage(&ledger, "10ms"));
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill timing seed: {seed}");
    let mut rng = Rng(seed);

    // Drivers: continuous calls to whichever process is current (port 0: none).
    let port = Arc::new(AtomicU16::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let attempted = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let drivers: Vec<_> = (0..3)
        .map(|i| {
            let (port, stop, attempted, answered) = (
                port.clone(),
                stop.clone(),
                attempted.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                let http = client();
                while !stop.load(Ordering::SeqCst) {
                    let p = port.load(Ordering::SeqCst);
                    if p == 0 {
                        tokio::time::sleep(ms(2)).await;
                        continue;
                    }
                    let body = if i == 0 {
                        r#"{"model":"gpt","stream":true,"messages":[]}"#.to_string()
                    } else {
                        chat_body("gpt", "")
                    };
                    attempted.fetch_add(1, Ordering::SeqCst);
                    let sent = http
                        .post(format!("http://127.0.0.1:{p}{CHAT}"))
                        .header("content-type", "application/json")
                        .timeout(Duration::from_secs(3))
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(resp) if resp.status() == 200 => {
                            if resp.bytes().await.is_ok() {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        _ => tokio::time::sleep(ms(2)).await,
                    }
                }
            })
        })
        .collect();

    let mut last = 0u64;
    let mut increases = 0;
    for run in 0..10 {
        let proc = EdgeProcess::start(&dir, run, &yaml);
        // What was saved is exactly what is loaded.
        let edge = Edge::new(proc.base());
        let loaded = edge.usage("group_by=model").await;
        assert_eq!(
            total(&loaded, "requests"),
            last,
            "run {run} loaded the last saved count: {loaded}"
        );
        port.store(proc.port, Ordering::SeqCst);
        tokio::time::sleep(ms(100 + rng.next(500))).await;
        proc.kill9();
        port.store(0, Ordering::SeqCst);

        assert!(
            !ledger.with_extension("unreadable").exists(),
            "run {run}: a ledger file was unreadable at start"
        );
        let Ok(text) = std::fs::read_to_string(&ledger) else {
            assert_eq!(last, 0, "run {run}: the ledger file disappeared");
            continue;
        };
        let file = parse_ledger(&text);
        let now = ledger_requests(&file);
        assert!(
            now >= last,
            "run {run}: the count went down from {last} to {now}"
        );
        assert!(
            now <= attempted.load(Ordering::SeqCst),
            "run {run}: {now} counted but only {} calls were made",
            attempted.load(Ordering::SeqCst)
        );
        for r in file["rows"].as_array().unwrap() {
            // Every success of this mock reports 12 + 7 tokens (non-stream) or 9 + 3 (stream).
            let (req, streamed) = (
                r["requests"].as_u64().unwrap(),
                r["streamed"].as_u64().unwrap(),
            );
            assert_eq!(r["successes"], req, "only successes here: {r}");
            assert_eq!(
                r["prompt_tokens"].as_u64().unwrap(),
                12 * (req - streamed) + 9 * streamed,
                "tokens counted with their call: {r}"
            );
            assert_eq!(r["key_id"], "main", "{r}");
        }
        if now > last {
            increases += 1;
        }
        last = now;
    }
    stop.store(true, Ordering::SeqCst);
    for d in drivers {
        d.await.unwrap();
    }
    println!(
        "kill -9 loop: {last} counted of {} answered, {} attempted",
        answered.load(Ordering::SeqCst),
        attempted.load(Ordering::SeqCst)
    );
    assert!(
        increases >= 5,
        "the ledger grew in only {increases} of 10 runs"
    );
    assert!(last > 0);
}
