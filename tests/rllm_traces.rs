//! End-to-end tests of the rLLM integration: path metadata (slugs, `/sessions/`), sampling
//! injection, call traces (SQLite, JSON Lines, the admin API), the bounded trace queue and
//! `strip_injected_fields`. llm-edge runs in-process in front of recording mock upstreams.

mod common;

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use common::harness::{Proxy, TempDir};
use common::mock::{Mock, Recorded, Reply, StreamEnd};
use common::{assert_error, client, post, wait_until, within};
use llm_edge::route::slug::{decode_slug, encode_slug};
use llm_edge::trace::record::TraceRecord;
use llm_edge::trace::sink::Sink;
use llm_edge::trace::{TraceMode, Tracer};
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn obj(v: &Value) -> &Map<String, Value> {
    v.as_object().expect("a JSON object")
}

/// A YAML double-quoted string for a path.
fn yaml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Posts and returns the body text, asserting a 200.
async fn post_ok(proxy: &Proxy, path: &str, body: &str) -> String {
    let resp = post(proxy, path, body.to_string()).await;
    let status = resp.status().as_u16();
    let text = within(Duration::from_secs(10), "reading the response", resp.text())
        .await
        .expect("response body");
    assert_eq!(status, 200, "POST {path}: {text}");
    text
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

// ---------------------------------------------------------------------------------------------
// Admin API and SQLite readers
// ---------------------------------------------------------------------------------------------

/// `POST /admin/traces/flush`; returns its JSON.
async fn flush(proxy: &Proxy) -> Value {
    let resp = client()
        .post(proxy.admin_url("/admin/traces/flush"))
        .send()
        .await
        .expect("flush request");
    assert_eq!(resp.status(), 200, "flush status");
    resp.json().await.expect("flush JSON")
}

/// Flushes until `written` reaches `expected` (at most 5 s), then checks it is exactly that.
///
/// A record is queued a moment after its response ended, so one flush right after a call may
/// not cover it yet: `flush_right_after_a_response_includes_its_trace` guards that on its own;
/// the other tests wait it out so they test only their own behaviour.
async fn flush_expecting(proxy: &Proxy, expected: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let f = flush(proxy).await;
        let written = f["written"].as_u64().expect("written");
        if written >= expected || Instant::now() >= deadline {
            assert_eq!(written, expected, "records written: {f}");
            return f;
        }
        tokio::time::sleep(ms(5)).await;
    }
}

/// `GET /admin/traces<query>`; returns `data` after checking the list shape.
async fn admin_list(proxy: &Proxy, query: &str) -> Vec<Value> {
    let resp = client()
        .get(proxy.admin_url(&format!("/admin/traces{query}")))
        .send()
        .await
        .expect("list request");
    assert_eq!(resp.status(), 200, "list status");
    let v: Value = resp.json().await.expect("list JSON");
    assert_eq!(v["object"], "list", "{v}");
    v["data"].as_array().expect("data is an array").clone()
}

/// `GET /admin/traces/{id}`.
async fn admin_get(proxy: &Proxy, id: &str) -> Value {
    let resp = client()
        .get(proxy.admin_url(&format!("/admin/traces/{id}")))
        .send()
        .await
        .expect("get request");
    assert_eq!(resp.status(), 200, "get status for {id}");
    resp.json().await.expect("trace JSON")
}

fn open_store(db: &Path) -> Connection {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open the trace store")
}

/// Records filed under `uid`, read straight from the SQLite file (rLLM's tables).
fn stored_by_session(db: &Path, uid: &str) -> Vec<Value> {
    let conn = open_store(db);
    let mut st = conn
        .prepare(
            "SELECT t.data FROM trace_sessions s JOIN traces t ON t.id = s.trace_id
             WHERE s.session_uid = ?1 ORDER BY t.created_at",
        )
        .expect("prepare");
    let rows = st
        .query_map([uid], |r| r.get::<_, String>(0))
        .expect("query");
    rows.map(|r| parse(&r.expect("row"))).collect()
}

fn count_rows(db: &Path, table: &str) -> i64 {
    open_store(db)
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .expect("count rows")
}

// ---------------------------------------------------------------------------------------------
// 1. Slugs
// ---------------------------------------------------------------------------------------------

/// Upstream `v` injects logprobs and token ids (and `include_usage` on streams); `vm` forwards
/// path metadata in the body. `q` and `shaped` (override + drop) are on `v`, `meta` on `vm`.
fn shaping_config(url: &str, extra: &str) -> String {
    format!(
        r#"
upstreams:
  v:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
    sampling: {{set_if_absent: {{logprobs: true, return_token_ids: true, "stream_options.include_usage": true}}}}
  vm:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
    forward_metadata: body
models:
  - {{name: q, upstream: v}}
  - {{name: shaped, upstream: v, sampling: {{override: {{temperature: 1.0, top_logprobs: 5}}, drop: [top_p]}}}}
  - {{name: meta, upstream: vm}}
{extra}
"#
    )
}

const SMALL_REPLY: &str = r#"{"id":"chatcmpl-x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// Written by Python's `json.dumps(m, separators=(",", ":"), sort_keys=True)` (ASCII escapes,
/// `1e-07`, `1e+21`), base64url without padding: exactly what rLLM's encoder sends. The
/// base64 uses both `-` and `_`.
const PYTHON_SLUG: &str = "rllm1:eyJhIjp7ImIiOlsxLDIuNSwtMC4xMjUsMWUtMDcsMWUrMjFdLCJjIjp7ImQiOm51bGwsImUiOnRydWV9fSwibmFtZSI6ImNhZlx1MDBlOSBcdWQ4M2RcdWRlMDAgXCJxXCIvKz8iLCJzZXNzaW9uX25hbWUiOiJzZXNzXzkiLCJzZXNzaW9uX3VpZHMiOlsidS0xIiwidS0yIl0sInQiOiJ-fn4_Pz4ifQ";

fn python_slug_value() -> Value {
    json!({
        "a": {"b": [1, 2.5, -0.125, 1e-7, 1e21], "c": {"d": null, "e": true}},
        "name": "caf\u{e9} \u{1F600} \"q\"/+?",
        "session_name": "sess_9",
        "session_uids": ["u-1", "u-2"],
        "t": "~~~??>"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rllm_slugs_are_decoded_and_stripped_before_routing() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));

    let nested = json!({
        "session_name": "s\u{e9}ss/\u{4e2d}",
        "session_uids": ["a", "b"],
        "deep": {"x": {"y": [0.1, -3.5e-5, 12345678901234567890u64, {"z": "\u{1}\t\n"}]}},
        "f": 0.30000000000000004
    });
    let padded = format!("rllm1:{}", URL_SAFE.encode(br#"{"session_name": "pads" }"#));
    assert!(padded.ends_with('='), "{padded}");
    let cases: Vec<(String, Value)> = vec![
        (
            "rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9".into(),
            json!({"session_name": "sess_123"}),
        ),
        ("rllm1:e30".into(), json!({})),
        (PYTHON_SLUG.into(), python_slug_value()),
        (encode_slug(obj(&nested)), nested.clone()),
        (padded, json!({"session_name": "pads"})),
    ];
    // The encoder writes rLLM's form: compact, key-sorted JSON, no padding.
    assert_eq!(
        encode_slug(obj(&json!({"session_name": "sess_123"}))),
        "rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9"
    );
    assert_eq!(encode_slug(&Map::new()), "rllm1:e30");

    for (i, (slug, expected)) in cases.iter().enumerate() {
        let decoded = decode_slug(slug.strip_prefix("rllm1:").unwrap(), 1 << 16)
            .unwrap_or_else(|e| panic!("decode_slug({slug}): {e}"));
        assert_eq!(Value::Object(decoded), *expected, "decode_slug({slug})");

        let body =
            format!(r#"{{"model":"meta","messages":[{{"role":"user","content":"case {i}"}}]}}"#);
        post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), &body).await;
        let seen = mock.requests().pop().expect("forwarded");
        assert_eq!(seen.uri, CHAT, "the slug segments are stripped ({slug})");
        let sent = parse(seen.body_str());
        assert_eq!(
            sent["metadata"]["rllm_metadata"], *expected,
            "metadata decoded from {slug}"
        );
        assert_eq!(
            sent["messages"],
            json!([{"role": "user", "content": format!("case {i}")}])
        );
    }
    assert_eq!(mock.requests().len(), cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_slugs_are_400_and_nothing_is_forwarded() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), "limits: {max_slug: 256B}"));
    let b64 = |bytes: &[u8]| format!("rllm1:{}", URL_SAFE_NO_PAD.encode(bytes));
    let over_limit = encode_slug(obj(&json!({"session_name": "x".repeat(300)})));
    assert!(over_limit.len() > 256 + 6);
    let cases = [
        ("rllm1:a".to_string(), "one base64 character"),
        ("rllm1:!!!".to_string(), "not base64url"),
        (b64(b"{nope"), "not JSON"),
        (b64(b"[1,2]"), "a JSON array"),
        (b64(b"\"sess\""), "a JSON string"),
        (b64(&[0x7b, 0xff, 0xfe, 0x7d]), "not UTF-8"),
        (over_limit, "longer than limits.max_slug"),
    ];
    let body = r#"{"model":"q","messages":[{"role":"user","content":"hi"}]}"#;
    for (slug, why) in &cases {
        let resp = post(&proxy, &format!("/meta/{slug}{CHAT}"), body).await;
        let err = assert_error(resp, 400, "bad_request").await;
        assert!(
            !err["error"]["message"].as_str().unwrap().is_empty(),
            "{why}"
        );
    }
    // The same limit applies to /sessions/ ids, and an empty id is refused.
    let long_id = format!("/sessions/{}{CHAT}", "s".repeat(300));
    for path in [long_id.as_str(), "/sessions//v1/chat/completions"] {
        let resp = post(&proxy, path, body).await;
        assert_error(resp, 400, "bad_request").await;
    }
    assert!(
        mock.requests().is_empty(),
        "nothing was forwarded: {:#?}",
        mock.requests()
    );
    assert_eq!(mock.accepted(), 0, "no upstream connection was even opened");
}

// ---------------------------------------------------------------------------------------------
// 2. Sampling injection, opt-out, metadata forwarding, /sessions/
// ---------------------------------------------------------------------------------------------

/// Messages with bytes a re-serialisation would change: spacing, `\u` escapes, a surrogate
/// pair, an escaped slash, an exponent.
const MESSAGES: &str = r#"[ {"role":"system","content":"Be terse.\n"} ,{"role":"user","content":"caf\u00e9 \ud83d\ude00 \"q\" \/ 1E2","name":"u1"}]"#;

fn assert_messages_intact(seen: &Recorded) {
    assert!(
        seen.body_str().contains(MESSAGES),
        "the messages reach the upstream byte for byte: {}",
        seen.body_str()
    );
}

fn assert_content_length_matches(seen: &Recorded) {
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str()),
        "Content-Length of the forwarded body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_fields_are_injected_and_messages_bytes_are_kept() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));
    let slug = encode_slug(obj(&json!({"session_name": "inj"})));
    let msgs = parse(MESSAGES);

    let body = format!(r#"{{"model":"q",  "messages":{MESSAGES} ,"temperature":0.5}}"#);
    let reply = post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), &body).await;
    assert_eq!(reply, SMALL_REPLY, "the response is relayed unchanged");
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.uri, CHAT);
    assert_messages_intact(&seen);
    assert_content_length_matches(&seen);
    assert_eq!(
        parse(seen.body_str()),
        json!({"model": "q", "messages": msgs, "temperature": 0.5,
               "logprobs": true, "return_token_ids": true}),
        "set_if_absent adds both fields; include_usage only goes on streams; no metadata \
         toward an upstream without forward_metadata"
    );

    // What the client set wins over set_if_absent.
    let body = format!(r#"{{"model":"q","messages":{MESSAGES},"logprobs":false}}"#);
    post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_messages_intact(&seen);
    assert_eq!(
        parse(seen.body_str()),
        json!({"model": "q", "messages": msgs, "logprobs": false, "return_token_ids": true})
    );

    // A stream also gets stream_options.include_usage, merged into the client's object.
    let body = format!(
        r#"{{"model":"q","messages":{MESSAGES},"stream":true,"stream_options":{{"continuous_usage_stats":false}}}}"#
    );
    post_ok(&proxy, CHAT, &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_messages_intact(&seen);
    assert_content_length_matches(&seen);
    assert_eq!(
        parse(seen.body_str()),
        json!({"model": "q", "messages": msgs, "stream": true,
               "stream_options": {"continuous_usage_stats": false, "include_usage": true},
               "logprobs": true, "return_token_ids": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_off_forwards_the_client_body_byte_for_byte() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));
    let body = format!(r#"{{"model":"q","messages":{MESSAGES},"stream":true }}"#);

    // By header.
    let resp = client()
        .post(proxy.url(CHAT))
        .header("content-type", "application/json")
        .header("x-llm-edge-inject", "off")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.body_str(), body, "header opt-out: nothing injected");

    // By slug key.
    let slug = encode_slug(obj(&json!({"session_name": "s", "llm_edge_inject": false})));
    post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.uri, CHAT);
    assert_eq!(seen.body_str(), body, "slug opt-out: nothing injected");

    // Drops still apply under the opt-out; the override and set_if_absent do not.
    let body =
        format!(r#"{{"model":"shaped","messages":{MESSAGES},"temperature":0.2,"top_p":0.9}}"#);
    let resp = client()
        .post(proxy.url(CHAT))
        .header("content-type", "application/json")
        .header("x-llm-edge-inject", "off")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.requests().pop().unwrap();
    assert_eq!(
        seen.body_str(),
        format!(r#"{{"model":"shaped","messages":{MESSAGES},"temperature":0.2}}"#),
        "only top_p was removed"
    );
    assert_content_length_matches(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_and_drop_edit_only_their_fields() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));
    let body = format!(
        r#"{{"top_p":0.9,"model":"shaped","temperature":0.2,"messages":{MESSAGES},"top_logprobs":1,"n":2}}"#
    );
    post_ok(&proxy, CHAT, &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_messages_intact(&seen);
    assert_content_length_matches(&seen);
    assert_eq!(
        parse(seen.body_str()),
        json!({"model": "shaped", "temperature": 1.0, "messages": parse(MESSAGES),
               "top_logprobs": 5, "n": 2, "logprobs": true, "return_token_ids": true}),
        "override replaces, drop removes (first member here), the upstream's set_if_absent \
         still applies to the model"
    );
    assert!(
        seen.body_str().starts_with(r#"{"model":"shaped""#),
        "dropping the first member leaves a valid object: {}",
        seen.body_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_metadata_body_puts_slug_metadata_in_rllm_metadata() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));
    let meta = json!({"session_name": "s-7", "session_uids": ["u1"], "step": 2});
    let slug = encode_slug(obj(&meta));

    let body = format!(r#"{{"model":"meta","metadata":{{"user":"alice"}},"messages":{MESSAGES}}}"#);
    post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.uri, CHAT);
    assert_messages_intact(&seen);
    assert_content_length_matches(&seen);
    assert_eq!(
        parse(seen.body_str()),
        json!({"model": "meta", "metadata": {"user": "alice", "rllm_metadata": meta},
               "messages": parse(MESSAGES)})
    );

    // Without path metadata nothing is added: the body goes as sent.
    post_ok(&proxy, CHAT, &body).await;
    assert_eq!(mock.requests().pop().unwrap().body_str(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_path_with_a_slash_in_the_id_is_stripped() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&shaping_config(&mock.url(), ""));
    let body = format!(r#"{{"model":"meta","messages":{MESSAGES}}}"#);
    post_ok(&proxy, "/sessions/a/b/v1/chat/completions", &body).await;
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.uri, CHAT);
    assert_messages_intact(&seen);
    assert_eq!(
        parse(seen.body_str())["metadata"],
        json!({"rllm_metadata": {"session_id": "a/b"}})
    );

    // The query string survives the stripping.
    post_ok(
        &proxy,
        "/sessions/run-1/ep/2/v1/chat/completions?x=1",
        &body,
    )
    .await;
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.uri, "/v1/chat/completions?x=1");
    assert_eq!(
        parse(seen.body_str())["metadata"]["rllm_metadata"],
        json!({"session_id": "run-1/ep/2"})
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Traces of vLLM calls
// ---------------------------------------------------------------------------------------------

/// vLLM upstream `v` serving `q` as `Qwen/Q` (injecting logprobs and token ids), traces as set.
fn traced_config(url: &str, tracing: &str) -> String {
    format!(
        r#"
upstreams:
  v:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
    sampling: {{set_if_absent: {{logprobs: true, return_token_ids: true, "stream_options.include_usage": true}}}}
models:
  - {{name: q, upstream: v, model: "Qwen/Q"}}
tracing: {tracing}
"#
    )
}

fn sqlite_tracing(mode: &str, db: &Path) -> String {
    format!("{{mode: {mode}, sqlite: {}}}", yaml_path(db))
}

/// A vLLM chat completion with `return_token_ids` and `logprobs`.
fn vllm_json_reply() -> String {
    json!({
        "id": "chatcmpl-ns1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "Qwen/Q",
        "prompt_token_ids": [151644, 872, 198],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hi \u{e9}!", "tool_calls": []},
            "logprobs": {"content": [
                {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []},
                {"token": " \u{e9}", "logprob": -1.5, "bytes": [32, 195, 169], "top_logprobs": []},
                {"token": "!", "logprob": -0.0078125, "bytes": [33], "top_logprobs": []}
            ]},
            "finish_reason": "stop",
            "stop_reason": null,
            "token_ids": [13048, 1880, 0]
        }],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    })
    .to_string()
}

fn assert_recent_timing(rec: &Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ts = rec["timestamp"].as_f64().expect("timestamp");
    assert!(
        (now - 60.0..=now + 1.0).contains(&ts),
        "timestamp {ts}, now {now}"
    );
    let latency = rec["latency_ms"].as_f64().expect("latency_ms");
    assert!(latency > 0.0 && latency < 10_000.0, "latency_ms {latency}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_trace_has_content_token_ids_logprobs_and_usage() {
    let dir = TempDir::new("trace-ns");
    let db = dir.join("traces.db");
    let reply = vllm_json_reply();
    let mock = Mock::replying(Reply::json(200, reply.clone()));
    let proxy = Proxy::start(&traced_config(&mock.url(), &sqlite_tracing("always", &db)));
    let meta =
        json!({"session_name": "sess-ns", "session_uids": ["uid-a", "uid-b"], "run": {"step": 3}});
    let slug = encode_slug(obj(&meta));
    let body = r#"{"model":"q","messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}"#;

    let got = post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), body).await;
    assert_eq!(got, reply, "the response is relayed unchanged");
    let f = flush_expecting(&proxy, 1).await;
    assert_eq!(
        (f["written"].as_u64(), f["dropped"].as_u64()),
        (Some(1), Some(0)),
        "{f}"
    );

    let listed = admin_list(&proxy, "?session_uid=uid-a").await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let rec = &listed[0];
    assert_eq!(rec["trace_id"], "chatcmpl-ns1");
    assert!(!rec["request_id"].as_str().unwrap().is_empty());
    assert_eq!(rec["name"], "proxy/q");
    assert_eq!(rec["route"], "chat_completions");
    assert_eq!(rec["model"], "q");
    assert_eq!(rec["upstream_model"], "Qwen/Q");
    assert_eq!(rec["upstream"], "v");
    assert_eq!(rec["replica"], mock.addr().to_string());
    assert_eq!(rec["session_name"], "sess-ns");
    assert_eq!(rec["session_uids"], json!(["uid-a", "uid-b"]));
    assert_eq!(rec["metadata"], meta);
    assert_eq!(
        rec["input"]["messages"],
        json!([{"role": "user", "content": "Say hi"}])
    );
    assert_eq!(rec["input"]["prompt_token_ids"], json!([151644, 872, 198]));
    let out = &rec["output"];
    assert_eq!(
        out["message"],
        json!({"role": "assistant", "content": "Hi \u{e9}!"})
    );
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["output_token_ids"], json!([13048, 1880, 0]));
    assert_eq!(out["rollout_logprobs"], json!([-0.25, -1.5, -0.0078125]));
    assert_eq!(
        out["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Hi \u{e9}!"},
                "finish_reason": "stop", "output_token_ids": [13048, 1880, 0],
                "rollout_logprobs": [-0.25, -1.5, -0.0078125]}])
    );
    assert_eq!(
        rec["tokens"],
        json!({"prompt": 3, "completion": 3, "total": 6})
    );
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["error"], Value::Null);
    assert_recent_timing(rec);

    // The same record by id, by the other uid, and straight from the SQLite file.
    assert_eq!(admin_get(&proxy, "chatcmpl-ns1").await, *rec);
    assert_eq!(admin_list(&proxy, "?session_uid=uid-b").await, listed);
    for uid in ["uid-a", "uid-b"] {
        assert_eq!(
            stored_by_session(&db, uid),
            listed,
            "trace_sessions row for {uid}"
        );
    }
    assert!(
        stored_by_session(&db, "sess-ns").is_empty(),
        "with session_uids, the session name is not a uid"
    );
    let (ctype, ns, meta_col): (String, String, String) = open_store(&db)
        .query_row(
            "SELECT context_type, namespace, metadata FROM traces WHERE id = 'chatcmpl-ns1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("traces row");
    assert_eq!(ctype, "llm_trace");
    assert_eq!(ns, "sess-ns");
    assert_eq!(parse(&meta_col), meta);
}

/// A vLLM chat stream, n=2: choice 0 answers in text, choice 1 calls a tool whose arguments are
/// split over three chunks; token ids and logprobs on every content chunk, an empty-delta chunk,
/// `usage: null` on the chunks and a final usage-only chunk.
fn vllm_stream_events() -> Vec<Value> {
    let lp = |pairs: &[(&str, f64)]| json!({"content": pairs.iter().map(|(t, l)| json!({"token": t, "logprob": l, "top_logprobs": []})).collect::<Vec<_>>()});
    let head = |choices: Value| {
        json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "Qwen/Q", "choices": choices, "usage": null})
    };
    let mut first = head(json!([
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null},
        {"index": 1, "delta": {"role": "assistant"}, "logprobs": null, "finish_reason": null}
    ]));
    first["prompt_token_ids"] = json!([1, 2, 3]);
    vec![
        first,
        head(json!([
            {"index": 0, "delta": {"content": "The"}, "token_ids": [791], "logprobs": lp(&[("The", -0.5)]), "finish_reason": null}
        ])),
        head(json!([
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]},
             "token_ids": [1000], "logprobs": lp(&[("<tool>", -0.125)]), "finish_reason": null}
        ])),
        head(json!([
            {"index": 0, "delta": {"content": " sk\u{e9}"}, "token_ids": [13180], "logprobs": lp(&[(" sk\u{e9}", -0.25)]), "finish_reason": null},
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]},
             "token_ids": [1001, 1002], "logprobs": lp(&[("{\"", -1.0), ("city\":", -2.0)]), "finish_reason": null}
        ])),
        head(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": null}])),
        head(json!([
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]},
             "token_ids": [1003], "logprobs": lp(&[("\"Paris\"}", -0.75)]), "finish_reason": "tool_calls"}
        ])),
        head(json!([
            {"index": 0, "delta": {"content": " is blue."}, "token_ids": [374, 6437, 13],
             "logprobs": lp(&[(" is", -0.0625), (" blue", -0.03125), (".", -0.001953125)]), "finish_reason": "stop"}
        ])),
        json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "Qwen/Q", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}),
    ]
}

/// The SSE text cut into chunks that each end in the middle of an event (one cut lands inside
/// a two-byte UTF-8 character), sent 2 ms apart.
fn cut_mid_event(events: &[String]) -> Vec<(Duration, Bytes)> {
    let text: String = events.concat();
    let bytes = text.as_bytes();
    let mut cuts: Vec<usize> = Vec::new();
    let mut at = 0;
    for e in events {
        cuts.push(at + e.len() / 2);
        at += e.len();
    }
    if let Some(p) = text.find('\u{e9}') {
        cuts.push(p + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        if c > start {
            out.push((ms(2), Bytes::copy_from_slice(&bytes[start..c])));
            start = c;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_trace_concatenates_ids_logprobs_and_content_per_choice() {
    let dir = TempDir::new("trace-stream");
    let db = dir.join("traces.db");
    let mut events: Vec<String> = vllm_stream_events().iter().map(sse).collect();
    events.push("data: [DONE]\n\n".into());
    let chunks = cut_mid_event(&events);
    let mock = Mock::replying(Reply::sse(chunks));
    let proxy = Proxy::start(&traced_config(
        &mock.url(),
        &sqlite_tracing("when_metadata", &db),
    ));
    let body =
        r#"{"model":"q","messages":[{"role":"user","content":"Weather?"}],"n":2,"stream":true}"#;

    let got = post_ok(&proxy, "/sessions/ep-42/v1/chat/completions", body).await;
    assert_eq!(got, events.concat(), "the stream is relayed byte for byte");
    let sent = parse(mock.only_request().body_str());
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    flush_expecting(&proxy, 1).await;

    let listed = admin_list(&proxy, "?session_uid=ep-42").await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let rec = &listed[0];
    assert_eq!(rec["trace_id"], "chatcmpl-s1");
    assert_eq!(rec["session_name"], "ep-42");
    assert_eq!(rec["metadata"], json!({"session_id": "ep-42"}));
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["error"], Value::Null);
    assert_eq!(rec["input"]["prompt_token_ids"], json!([1, 2, 3]));
    assert_eq!(
        rec["tokens"],
        json!({"prompt": 3, "completion": 9, "total": 12})
    );
    let choice0 = json!({
        "index": 0,
        "message": {"role": "assistant", "content": "The sk\u{e9} is blue."},
        "finish_reason": "stop",
        "output_token_ids": [791, 13180, 374, 6437, 13],
        "rollout_logprobs": [-0.5, -0.25, -0.0625, -0.03125, -0.001953125]
    });
    let choice1 = json!({
        "index": 1,
        "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
        ]},
        "finish_reason": "tool_calls",
        "output_token_ids": [1000, 1001, 1002, 1003],
        "rollout_logprobs": [-0.125, -1.0, -2.0, -0.75]
    });
    assert_eq!(rec["output"]["choices"], json!([choice0, choice1]));
    assert_eq!(rec["output"]["message"], choice0["message"]);
    assert_eq!(rec["output"]["finish_reason"], "stop");
    assert_eq!(
        rec["output"]["output_token_ids"],
        choice0["output_token_ids"]
    );
    assert_eq!(
        rec["output"]["rollout_logprobs"],
        choice0["rollout_logprobs"]
    );
    let ttft = rec["ttft_ms"].as_f64().expect("ttft_ms");
    let latency = rec["latency_ms"].as_f64().unwrap();
    assert!(
        ttft > 0.0 && ttft <= latency,
        "ttft {ttft} latency {latency}"
    );
    assert_recent_timing(rec);
    assert_eq!(stored_by_session(&db, "ep-42"), listed);
}

/// A long vLLM stream of one choice, a token per chunk as vLLM sends them for an RL rollout
/// (logprobs with a top logprob and bytes, token ids, `usage: null`), a newline token in every
/// seven, the last token with its finish reason, then the usage chunk. Returns the events and
/// the content, ids and logprobs the trace must hold.
fn vllm_token_stream(tokens: usize) -> (Vec<String>, String, Vec<i64>, Vec<f64>) {
    let mut events = Vec::new();
    let (mut content, mut ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    let mut first = json!({"id": "chatcmpl-long", "object": "chat.completion.chunk",
        "created": 1_700_000_000, "model": "Qwen/Q", "usage": null,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                     "logprobs": null, "finish_reason": null}]});
    first["prompt_token_ids"] = json!([11, 12, 13]);
    events.push(sse(&first));
    for k in 0..tokens {
        let token = if k % 7 == 6 {
            "\n".to_string()
        } else {
            format!(" w{k}")
        };
        let (id, lp) = (5000 + k as i64, -((k + 1) as f64) / 64.0);
        let finish = if k + 1 == tokens {
            json!("length")
        } else {
            Value::Null
        };
        events.push(sse(
            &json!({"id": "chatcmpl-long", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": "Qwen/Q", "usage": null,
            "choices": [{"index": 0, "delta": {"content": token},
                "logprobs": {"content": [{"token": token, "logprob": lp,
                    "bytes": token.as_bytes(),
                    "top_logprobs": [{"token": "x", "logprob": lp - 1.0, "bytes": [120]}]}]},
                "finish_reason": finish, "token_ids": [id]}]}),
        ));
        content.push_str(&token);
        ids.push(id);
        logprobs.push(lp);
    }
    events.push(sse(
        &json!({"id": "chatcmpl-long", "object": "chat.completion.chunk",
        "created": 1_700_000_000, "model": "Qwen/Q", "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}}),
    ));
    events.push("data: [DONE]\n\n".into());
    (events, content, ids, logprobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_vllm_stream_is_traced_token_for_token_however_it_is_cut() {
    let (events, content, ids, logprobs) = vllm_token_stream(60);
    // Whole events three to a network chunk (read in place), and every event cut in two
    // (each completed by the splitter).
    let grouped: Vec<(Duration, Bytes)> = events
        .chunks(3)
        .map(|g| (ms(1), Bytes::from(g.concat())))
        .collect();
    for (how, chunks) in [("grouped", grouped), ("cut", cut_mid_event(&events))] {
        let dir = TempDir::new("trace-long");
        let db = dir.join("traces.db");
        let mock = Mock::replying(Reply::sse(chunks));
        let proxy = Proxy::start(&traced_config(&mock.url(), &sqlite_tracing("always", &db)));
        let body = r#"{"model":"q","messages":[{"role":"user","content":"go"}],"stream":true}"#;

        let got = post_ok(&proxy, "/v1/chat/completions", body).await;
        assert_eq!(got, events.concat(), "{how}: relayed byte for byte");
        flush_expecting(&proxy, 1).await;
        let listed = admin_list(&proxy, "").await;
        assert_eq!(listed.len(), 1, "{how}");
        let rec = &listed[0];
        assert_eq!(rec["trace_id"], "chatcmpl-long", "{how}");
        assert_eq!(
            rec["input"]["prompt_token_ids"],
            json!([11, 12, 13]),
            "{how}"
        );
        let choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "length",
            "output_token_ids": ids,
            "rollout_logprobs": logprobs,
        });
        assert_eq!(rec["output"]["choices"], json!([choice]), "{how}");
        assert_eq!(
            rec["tokens"],
            json!({"prompt": 3, "completion": 60, "total": 63}),
            "{how}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cut_midway_is_traced_with_error_and_partial_output() {
    let dir = TempDir::new("trace-cut");
    let db = dir.join("traces.db");
    let chunk = |content: &str, id: i64, lp: f64| {
        sse(
            &json!({"id": "chatcmpl-cut", "model": "Qwen/Q", "choices": [
            {"index": 0, "delta": {"content": content}, "token_ids": [id],
             "logprobs": {"content": [{"token": content, "logprob": lp}]}, "finish_reason": null}]}),
        )
    };
    let chunks = vec![
        (ms(0), Bytes::from(chunk("Par", 1, -0.5))),
        (ms(5), Bytes::from(chunk("tial", 2, -0.25))),
        (
            ms(5),
            Bytes::from_static(b"data: {\"id\":\"chatcmpl-cut\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"NEVER"),
        ),
    ];
    let mock = Mock::replying(Reply::sse(chunks).then_abort(ms(50)));
    let proxy = Proxy::start(&traced_config(&mock.url(), &sqlite_tracing("always", &db)));
    let slug = encode_slug(obj(&json!({"session_name": "cut-1"})));
    let body = r#"{"model":"q","messages":[{"role":"user","content":"go"}],"stream":true}"#;

    let resp = post(&proxy, &format!("/meta/{slug}{CHAT}"), body).await;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let mut resp = resp;
    let mut broken = false;
    loop {
        match within(Duration::from_secs(10), "reading the stream", resp.chunk()).await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break,
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    assert!(broken, "the client sees a broken body, not a clean end");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("\"error\""),
        "an error event ends the stream: {text}"
    );
    let (_, end) = mock.streams()[0]
        .wait_end(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(end, StreamEnd::Aborted);

    flush_expecting(&proxy, 1).await;
    let listed = admin_list(&proxy, "?session_uid=cut-1").await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let rec = &listed[0];
    assert_eq!(rec["trace_id"], "chatcmpl-cut");
    assert_eq!(rec["status"], 200, "the status that was sent to the client");
    let error = rec["error"].as_str().expect("error is set");
    assert!(!error.is_empty());
    assert_eq!(
        rec["output"]["message"],
        json!({"role": "assistant", "content": "Partial"})
    );
    assert_eq!(rec["output"]["output_token_ids"], json!([1, 2]));
    assert_eq!(rec["output"]["rollout_logprobs"], json!([-0.5, -0.25]));
    assert_eq!(rec["output"]["finish_reason"], Value::Null);
    assert_eq!(stored_by_session(&db, "cut-1"), listed);
}

// ---------------------------------------------------------------------------------------------
// 4. Anthropic Messages stream
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_stream_trace_has_content_and_usage() {
    let dir = TempDir::new("trace-anthropic");
    let db = dir.join("traces.db");
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_01X", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for t in ["Hello", ", wor", "ld \u{e9}"] {
        events.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        ));
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 12}}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    let mock = Mock::replying(Reply::sse(cut_mid_event(&events)));
    let yaml = format!(
        r#"
upstreams:
  a:
    kind: anthropic
    endpoints: ["{}"]
    keys: [os.environ/ANT_KEY]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: claude, upstream: a, model: claude-x}}
tracing: {}
"#,
        mock.url(),
        sqlite_tracing("when_metadata", &db)
    );
    let proxy = Proxy::start_with_env(&yaml, &[("ANT_KEY", "sk-ant-test")]);
    let body = r#"{"model":"claude","max_tokens":64,"system":"Be brief.","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

    let got = post_ok(&proxy, "/sessions/ant-1/v1/messages", body).await;
    assert_eq!(got, events.concat(), "the stream is relayed byte for byte");
    let seen = mock.only_request();
    assert_eq!(seen.uri, "/v1/messages");
    flush_expecting(&proxy, 1).await;

    let listed = admin_list(&proxy, "?session_uid=ant-1").await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let rec = &listed[0];
    assert_eq!(rec["trace_id"], "msg_01X");
    assert_eq!(rec["route"], "messages");
    assert_eq!(rec["model"], "claude");
    assert_eq!(rec["upstream_model"], "claude-x");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["status"], 200);
    assert_eq!(
        rec["input"]["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    );
    assert_eq!(
        rec["output"]["message"],
        json!({"role": "assistant", "content": "Hello, world \u{e9}"})
    );
    assert_eq!(rec["output"]["finish_reason"], "end_turn");
    assert_eq!(
        rec["tokens"],
        json!({"prompt": 30, "completion": 12, "total": 42, "cached": 5}),
        "prompt = input + cache read + cache creation; completion from message_delta"
    );
    assert_eq!(stored_by_session(&db, "ant-1"), listed);
}

// ---------------------------------------------------------------------------------------------
// 5. Modes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_metadata_traces_only_calls_with_a_slug_or_session() {
    let dir = TempDir::new("trace-when");
    let db = dir.join("traces.db");
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&traced_config(
        &mock.url(),
        &sqlite_tracing("when_metadata", &db),
    ));
    let body = r#"{"model":"q","messages":[{"role":"user","content":"hi"}]}"#;

    post_ok(&proxy, CHAT, body).await;
    let f = flush(&proxy).await;
    assert_eq!(f["written"], 0, "a plain call is not traced: {f}");

    post_ok(&proxy, "/sessions/a/b/v1/chat/completions", body).await;
    let slug = encode_slug(obj(
        &json!({"session_name": "named", "session_uids": ["x1"]}),
    ));
    post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), body).await;
    let f = flush_expecting(&proxy, 2).await;
    assert_eq!(f["written"], 2, "{f}");
    assert_eq!(mock.requests().len(), 3);

    let all = admin_list(&proxy, "").await;
    assert_eq!(all.len(), 2, "{all:#?}");
    let by_session = stored_by_session(&db, "a/b");
    assert_eq!(by_session.len(), 1);
    assert_eq!(by_session[0]["session_name"], "a/b");
    assert_eq!(by_session[0]["metadata"], json!({"session_id": "a/b"}));
    assert_eq!(stored_by_session(&db, "x1").len(), 1);
    assert_eq!(count_rows(&db, "traces"), 2);
    assert_eq!(count_rows(&db, "trace_sessions"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_traces_filters_by_session_since_and_limit() {
    let dir = TempDir::new("trace-query");
    let db = dir.join("traces.db");
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&traced_config(&mock.url(), &sqlite_tracing("always", &db)));
    for (i, path) in [
        "/sessions/s1/v1/chat/completions",
        "/sessions/s2/v1/chat/completions",
        "/sessions/s1/v1/chat/completions",
        "/sessions/s1/v1/chat/completions",
    ]
    .iter()
    .enumerate()
    {
        let body =
            format!(r#"{{"model":"q","messages":[{{"role":"user","content":"call {i}"}}]}}"#);
        post_ok(&proxy, path, &body).await;
        tokio::time::sleep(ms(5)).await;
    }
    flush_expecting(&proxy, 4).await;
    let content = |recs: &[Value]| -> Vec<String> {
        recs.iter()
            .map(|r| {
                r["input"]["messages"][0]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let s1 = admin_list(&proxy, "?session_uid=s1").await;
    assert_eq!(content(&s1), ["call 0", "call 2", "call 3"], "oldest first");
    assert_eq!(
        content(&admin_list(&proxy, "?session_uid=s2").await),
        ["call 1"]
    );
    assert_eq!(admin_list(&proxy, "?limit=2").await.len(), 2);
    assert_eq!(admin_list(&proxy, "?session_uid=s1&limit=1").await.len(), 1);
    // Between calls 0 and 2 (5 ms apart): independent of float round trips through JSON.
    let since = (s1[0]["timestamp"].as_f64().unwrap() + s1[1]["timestamp"].as_f64().unwrap()) / 2.0;
    let newer = admin_list(&proxy, &format!("?session_uid=s1&since={since}")).await;
    assert_eq!(content(&newer), ["call 2", "call 3"]);
    assert!(admin_list(&proxy, "?session_uid=nobody").await.is_empty());
    let resp = client()
        .get(proxy.admin_url("/admin/traces/no-such-trace"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "not_found").await;
    let resp = client()
        .get(proxy.admin_url("/admin/traces?since=yesterday"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "bad_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_never_traces_nothing() {
    let dir = TempDir::new("trace-never");
    let db = dir.join("traces.db");
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let proxy = Proxy::start(&traced_config(&mock.url(), &sqlite_tracing("never", &db)));
    let body = r#"{"model":"q","messages":[{"role":"user","content":"hi"}]}"#;
    let slug = encode_slug(obj(&json!({"session_name": "n"})));
    post_ok(&proxy, CHAT, body).await;
    post_ok(&proxy, &format!("/meta/{slug}{CHAT}"), body).await;
    post_ok(&proxy, "/sessions/n/v1/chat/completions", body).await;
    assert_eq!(mock.requests().len(), 3);
    let f = flush(&proxy).await;
    assert_eq!(f["written"], 0, "{f}");
    if db.exists() {
        assert_eq!(count_rows(&db, "traces"), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. JSON Lines
// ---------------------------------------------------------------------------------------------

/// Replies by request: `"stream":true` → a short SSE stream, `"fail"` in the body → a 500,
/// else a JSON completion.
fn mixed_mock() -> Mock {
    Mock::start(|r| {
        let body = r.body_str();
        if body.contains("\"stream\":true") {
            Reply::sse(vec![
                (ms(0), Bytes::from_static(b"data: {\"id\":\"chatcmpl-j2\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"str\"},\"token_ids\":[5]}]}\n\n")),
                (ms(0), Bytes::from_static(b"data: {\"id\":\"chatcmpl-j2\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"eam\"},\"token_ids\":[6],\"finish_reason\":\"stop\"}]}\n\n")),
                (ms(0), Bytes::from_static(b"data: [DONE]\n\n")),
            ])
        } else if body.contains("fail") {
            Reply::json(500, r#"{"error":{"message":"boom","type":"server_error"}}"#)
        } else {
            Reply::json(200, SMALL_REPLY)
        }
    })
}

fn jsonl_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_sink_writes_one_parseable_line_per_call() {
    let dir = TempDir::new("trace-jsonl");
    let path = dir.join("traces.jsonl");
    let mock = mixed_mock();
    let proxy = Proxy::start(&traced_config(
        &mock.url(),
        &format!("{{mode: always, jsonl: {}}}", yaml_path(&path)),
    ));
    post_ok(
        &proxy,
        CHAT,
        r#"{"model":"q","messages":[{"role":"user","content":"one"}]}"#,
    )
    .await;
    post_ok(
        &proxy,
        CHAT,
        r#"{"model":"q","messages":[{"role":"user","content":"two"}],"stream":true}"#,
    )
    .await;
    let resp = post(
        &proxy,
        CHAT,
        r#"{"model":"q","messages":[{"role":"user","content":"fail"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 500);
    let _ = resp.bytes().await;
    let f = flush_expecting(&proxy, 3).await;
    assert_eq!(f["written"], 3, "{f}");

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'), "every line is terminated");
    let lines = jsonl_lines(&path);
    assert_eq!(lines.len(), 3, "{text}");
    let recs: Vec<TraceRecord> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect();
    // A record is queued once its response has been sent, so the next call of a sequential
    // client can be recorded first: lines follow completion, not the calls' order.
    let mut recs = recs;
    recs.sort_by_key(|r| (r.status, r.stream));
    let summary: Vec<(u16, bool, String)> = recs
        .iter()
        .map(|r| {
            (
                r.status,
                r.stream,
                r.output
                    .message
                    .as_ref()
                    .and_then(|m| m.content.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (200, false, "ok".to_string()),
            (200, true, "stream".to_string()),
            (500, false, String::new())
        ]
    );
    assert_eq!(recs[1].output.output_token_ids, [5, 6]);
    let mut ids: Vec<&str> = recs.iter().map(|r| r.request_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one record per call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_rotates_at_max_size() {
    let dir = TempDir::new("trace-rotate");
    let path = dir.join("traces.jsonl");
    const MAX: u64 = 2000;
    let mock = mixed_mock();
    let proxy = Proxy::start(&traced_config(
        &mock.url(),
        &format!(
            "{{mode: always, jsonl: {}, jsonl_max_size: {MAX}B, jsonl_keep: 20}}",
            yaml_path(&path)
        ),
    ));
    const CALLS: usize = 8;
    for i in 0..CALLS {
        let body =
            format!(r#"{{"model":"q","messages":[{{"role":"user","content":"call {i}"}}]}}"#);
        post_ok(&proxy, CHAT, &body).await;
        // One batch per call, so rotation is exercised across writes as well.
        flush_expecting(&proxy, i as u64 + 1).await;
    }
    let rotated = dir.join("traces.jsonl.1");
    assert!(rotated.exists(), "a .1 file after {CALLS} records of ~1 KB");
    let mut contents = Vec::new();
    let mut files = 0;
    for name in std::iter::once("traces.jsonl".to_string())
        .chain((1..=20).map(|i| format!("traces.jsonl.{i}")))
    {
        let p = dir.join(&name);
        if !p.exists() {
            continue;
        }
        files += 1;
        let size = std::fs::metadata(&p).unwrap().len();
        let lines = jsonl_lines(&p);
        assert!(
            size <= MAX || lines.len() == 1,
            "{name} is {size} bytes with {} lines",
            lines.len()
        );
        for l in lines {
            let rec: TraceRecord =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line in {name} ({e})"));
            let messages: serde_json::Value =
                serde_json::from_str(rec.input.messages.unwrap().get()).unwrap();
            contents.push(messages[0]["content"].clone());
        }
    }
    assert!(files >= 2, "{files} files");
    contents.sort_by_key(|c| c.as_str().unwrap().to_string());
    let expected: Vec<Value> = (0..CALLS).map(|i| json!(format!("call {i}"))).collect();
    assert_eq!(contents, expected, "every record is in exactly one file");
}

// ---------------------------------------------------------------------------------------------
// 7. Queue overflow
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct GateState {
    open: bool,
    entered: usize,
    written: usize,
}

/// A sink that blocks in `write` until the test opens the gate.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    fn open(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap().open = true;
        cv.notify_all();
    }

    fn entered(&self) -> usize {
        self.0 .0.lock().unwrap().entered
    }

    fn written(&self) -> usize {
        self.0 .0.lock().unwrap().written
    }
}

impl Sink for Gate {
    fn write(&mut self, batch: &[TraceRecord]) -> Result<(), String> {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        st.entered += 1;
        while !st.open {
            st = cv.wait(st).unwrap();
        }
        st.written += batch.len();
        Ok(())
    }
}

/// Opens the gate when dropped, so a failing test never leaves the writer thread blocked.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_trace_queue_drops_and_counts_without_blocking_requests() {
    let mock = Mock::replying(Reply::json(200, SMALL_REPLY));
    let gate = Gate::default();
    let tracer = Arc::new(Tracer::with_sinks(
        TraceMode::Always,
        vec![Box::new(gate.clone())],
        2,
        None,
    ));
    // The config's own `tracing:` is unused: the given tracer (queue of 2) replaces it.
    let proxy =
        Proxy::start_with_tracer(&traced_config(&mock.url(), "{mode: never}"), tracer.clone());
    // Dropped first: the proxy's shutdown and the tracer's drop wait for the writer thread.
    let _open_at_end = OpenOnDrop(gate.clone());
    let body = r#"{"model":"q","messages":[{"role":"user","content":"hi"}]}"#;

    // The first record reaches the sink, which blocks the writer thread.
    post_ok(&proxy, CHAT, body).await;
    assert!(
        wait_until(Duration::from_secs(5), || gate.entered() == 1).await,
        "the writer reached the sink"
    );
    // Two more fill the queue; the next eight find it full.
    for i in 0..10 {
        let t = Instant::now();
        post_ok(&proxy, CHAT, body).await;
        assert!(
            t.elapsed() < ms(1000),
            "request {i} took {:?} while the sink was blocked",
            t.elapsed()
        );
    }
    // The last record is queued just after its response ends.
    wait_until(Duration::from_secs(5), || tracer.dropped() >= 8).await;
    assert_eq!(
        tracer.dropped(),
        8,
        "queue of 2: records 2-3 wait, 4-11 are dropped"
    );
    assert_eq!(gate.written(), 0);
    assert_eq!(mock.requests().len(), 11, "every request was served");

    gate.open();
    within(
        Duration::from_secs(5),
        "flushing after the sink opened",
        tracer.flush(),
    )
    .await;
    assert_eq!(gate.written(), 3);
    assert_eq!(tracer.written(), 3);
    let f = flush(&proxy).await;
    assert_eq!(f["dropped"], 8, "{f}");
    assert_eq!(f["written"], 3, "{f}");

    // Once the queue drains, calls are traced again.
    post_ok(&proxy, CHAT, body).await;
    let f = flush_expecting(&proxy, 4).await;
    assert_eq!(
        (f["written"].as_u64(), f["dropped"].as_u64()),
        (Some(4), Some(8)),
        "{f}"
    );
    assert_eq!(gate.written(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flush_right_after_a_response_includes_its_trace() {
    // rLLM reads an episode's traces as soon as its calls return: a flush sent after the client
    // has the whole response must cover that call's record. Parallel rollouts, each calling,
    // then flushing and reading its own session, as a trainer does; completions of a few
    // thousand tokens with logprobs and token ids, as RL rollouts ask for.
    let dir = TempDir::new("trace-flush-race");
    let db = dir.join("traces.db");
    let tokens = 4000;
    let reply = json!({
        "id": "chatcmpl-race",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "x".repeat(tokens)},
            "logprobs": {"content": vec![json!({"token": "x", "logprob": -0.5, "top_logprobs": []}); tokens]},
            "token_ids": vec![7; tokens],
            "finish_reason": "length"
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    })
    .to_string();
    let mock = Mock::replying(Reply::json(200, reply));
    let proxy = Arc::new(Proxy::start(&traced_config(
        &mock.url(),
        &sqlite_tracing("always", &db),
    )));
    const ROLLOUTS: usize = 8;
    const TURNS: usize = 6;
    let mut tasks = Vec::new();
    for r in 0..ROLLOUTS {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let body = r#"{"model":"q","messages":[{"role":"user","content":"hi"}]}"#;
            let mut missed = Vec::new();
            for t in 0..TURNS {
                let session = format!("rollout-{r}-turn-{t}");
                post_ok(&proxy, &format!("/sessions/{session}{CHAT}"), body).await;
                flush(&proxy).await;
                if admin_list(&proxy, &format!("?session_uid={session}"))
                    .await
                    .is_empty()
                {
                    missed.push(session);
                }
            }
            missed
        }));
    }
    let mut missed = Vec::new();
    for t in tasks {
        missed.extend(t.await.expect("rollout task"));
    }
    assert!(
        missed.is_empty(),
        "{} of {} calls had no trace after a flush sent once their response had ended: {missed:?}",
        missed.len(),
        ROLLOUTS * TURNS
    );
    // Every call is traced eventually.
    let all_written = wait_until(Duration::from_secs(5), || {
        count_rows(&db, "traces") == (ROLLOUTS * TURNS) as i64
    })
    .await;
    assert!(all_written);
}

// ---------------------------------------------------------------------------------------------
// 8. strip_injected_fields
// ---------------------------------------------------------------------------------------------

/// `q` on a vLLM upstream that injects logprobs, token ids and `include_usage`, with
/// `strip_injected_fields: true`; every call traced to SQLite.
fn strip_config(url: &str, db: &Path) -> String {
    format!(
        r#"
upstreams:
  v:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
    sampling: {{set_if_absent: {{logprobs: true, return_token_ids: true, "stream_options.include_usage": true}}}}
models:
  - {{name: q, upstream: v, strip_injected_fields: true}}
tracing: {}
"#,
        sqlite_tracing("always", db)
    )
}

/// What the client should see of an upstream object when llm-edge injected `logprobs`,
/// `return_token_ids` and/or `include_usage` for it; `None` when the whole event is withheld.
fn as_if_not_injected(v: &Value, logprobs: bool, token_ids: bool, usage: bool) -> Option<Value> {
    let mut v = v.clone();
    let o = v.as_object_mut().unwrap();
    if usage {
        let no_choices = o["choices"].as_array().is_some_and(|c| c.is_empty());
        if no_choices && o.get("usage").is_some_and(|u| !u.is_null()) {
            return None;
        }
        if o.get("usage") == Some(&Value::Null) {
            o.remove("usage");
        }
    }
    if token_ids {
        o.remove("prompt_token_ids");
    }
    for c in o["choices"].as_array_mut().unwrap() {
        let c = c.as_object_mut().unwrap();
        if token_ids {
            c.remove("token_ids");
            c.remove("prompt_token_ids");
        }
        if logprobs {
            c.remove("logprobs");
        }
    }
    Some(v)
}

/// Splits SSE text into events, checking each is one `data:` line ended by a blank line.
fn sse_data(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "the stream ends on an event boundary: {text:?}"
    );
    text[..text.len() - 2]
        .split("\n\n")
        .map(|e| {
            assert!(!e.contains('\n'), "one line per event: {e:?}");
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_injected_fields_cleans_json_responses_and_traces_keep_them() {
    let dir = TempDir::new("strip-json");
    let db = dir.join("traces.db");
    let reply = vllm_json_reply();
    let mock = Mock::replying(Reply::json(200, reply.clone()));
    let proxy = Proxy::start(&strip_config(&mock.url(), &db));
    let upstream_reply = parse(&reply);

    // Nothing asked for: logprobs, token ids removed.
    let body = r#"{"model":"q","messages":[{"role":"user","content":"Say hi"}]}"#;
    let resp = post(&proxy, CHAT, body).await;
    assert_eq!(resp.status(), 200);
    let length = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(resp.headers().get("transfer-encoding").is_none());
    let got = resp.bytes().await.unwrap();
    assert_eq!(
        length,
        Some(got.len().to_string()),
        "Content-Length is corrected"
    );
    let sent = parse(mock.requests().pop().unwrap().body_str());
    assert_eq!(
        (sent["logprobs"].clone(), sent["return_token_ids"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(
        parse(std::str::from_utf8(&got).unwrap()),
        as_if_not_injected(&upstream_reply, true, true, false).unwrap()
    );
    assert!(!String::from_utf8_lossy(&got).contains("token_ids"));
    assert!(!String::from_utf8_lossy(&got).contains("logprob"));

    // The client asked for logprobs: they stay; token ids (still injected) go.
    let body = r#"{"model":"q","messages":[{"role":"user","content":"Say hi"}],"logprobs":true}"#;
    let got = post_ok(&proxy, CHAT, body).await;
    assert_eq!(
        parse(&got),
        as_if_not_injected(&upstream_reply, false, true, false).unwrap()
    );

    // Nothing injected: the response is relayed byte for byte.
    let resp = client()
        .post(proxy.url(CHAT))
        .header("content-type", "application/json")
        .header("x-llm-edge-inject", "off")
        .body(r#"{"model":"q","messages":[{"role":"user","content":"Say hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), reply);

    flush_expecting(&proxy, 3).await;
    let all = admin_list(&proxy, "").await;
    assert_eq!(all.len(), 3);
    for rec in &all {
        assert_eq!(rec["output"]["output_token_ids"], json!([13048, 1880, 0]));
        assert_eq!(
            rec["output"]["rollout_logprobs"],
            json!([-0.25, -1.5, -0.0078125])
        );
        assert_eq!(rec["input"]["prompt_token_ids"], json!([151644, 872, 198]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_injected_fields_cleans_every_sse_event_and_traces_keep_them() {
    let dir = TempDir::new("strip-sse");
    let db = dir.join("traces.db");
    let upstream_events = vllm_stream_events();
    let mut events: Vec<String> = upstream_events.iter().map(sse).collect();
    events.push("data: [DONE]\n\n".into());
    let mock = Mock::replying(Reply::sse(cut_mid_event(&events)));
    let proxy = Proxy::start(&strip_config(&mock.url(), &db));

    // All three injected: no logprobs, no token ids, no usage chunk, no `"usage":null`.
    let body =
        r#"{"model":"q","messages":[{"role":"user","content":"Weather?"}],"n":2,"stream":true}"#;
    let resp = post(&proxy, CHAT, body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let got = resp.text().await.unwrap();
    let sent = parse(mock.requests().pop().unwrap().body_str());
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    let mut expected: Vec<String> = upstream_events
        .iter()
        .filter_map(|e| as_if_not_injected(e, true, true, true))
        .map(|v| v.to_string())
        .collect();
    expected.push("[DONE]".into());
    let data = sse_data(&got);
    assert_eq!(
        data.len(),
        expected.len(),
        "only the usage chunk is withheld:\n{got}"
    );
    for (i, (d, e)) in data.iter().zip(&expected).enumerate() {
        if e == "[DONE]" {
            assert_eq!(d, e);
        } else {
            assert_eq!(parse(d), parse(e), "event {i}");
        }
    }
    for needle in ["token_ids", "logprob", "usage"] {
        assert!(!got.contains(needle), "{needle} reached the client:\n{got}");
    }

    // The client asked for usage and logprobs: both stay, token ids go.
    let body = r#"{"model":"q","messages":[{"role":"user","content":"Weather?"}],"n":2,"stream":true,"logprobs":true,"stream_options":{"include_usage":true}}"#;
    let got = post_ok(&proxy, CHAT, body).await;
    let mut expected: Vec<Value> = upstream_events
        .iter()
        .filter_map(|e| as_if_not_injected(e, false, true, false))
        .collect();
    expected.push(Value::Null);
    let data = sse_data(&got);
    let parsed: Vec<Value> = data
        .iter()
        .map(|d| if d == "[DONE]" { Value::Null } else { parse(d) })
        .collect();
    assert_eq!(parsed, expected);

    flush_expecting(&proxy, 2).await;
    let all = admin_list(&proxy, "").await;
    assert_eq!(all.len(), 2);
    for rec in &all {
        assert_eq!(rec["input"]["prompt_token_ids"], json!([1, 2, 3]));
        assert_eq!(
            rec["tokens"],
            json!({"prompt": 3, "completion": 9, "total": 12})
        );
        let choices = &rec["output"]["choices"];
        assert_eq!(
            choices[0]["output_token_ids"],
            json!([791, 13180, 374, 6437, 13])
        );
        assert_eq!(
            choices[0]["rollout_logprobs"],
            json!([-0.5, -0.25, -0.0625, -0.03125, -0.001953125])
        );
        assert_eq!(
            choices[1]["output_token_ids"],
            json!([1000, 1001, 1002, 1003])
        );
        assert_eq!(choices[0]["message"]["content"], "The sk\u{e9} is blue.");
    }
}
