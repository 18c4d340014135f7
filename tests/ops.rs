//! End-to-end tests of what operators see and do: `/metrics` counts that match the traffic
//! sent (and pass `promtool check metrics`), retries by cause, access log lines in nginx
//! `combined` and JSON, active health checks that eject and re-admit a replica, and config
//! reloads (under 50 open streams, refused when invalid, keeping key cooldowns).
//!
//! Most tests use the harness; reload tests run llm-edge from a config file they rewrite.

mod common;

use bytes::Bytes;
use common::harness::{free_port, Proxy, StopWatch, TempDir};
use common::mock::{Mock, Recorded, Reply, StreamEnd};
use common::{assert_error, client, wait_until, within};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llm_edge::server::{EdgeServer, RunOptions};
use pingora::server::RunArgs;
use regex::Regex;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const CHAT: &str = "/v1/chat/completions";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn chat_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

fn stream_body(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// A chat completion reporting 10 prompt and 5 completion tokens.
const CHAT_JSON: &str = r#"{"id":"chatcmpl-ops","object":"chat.completion","created":1700000000,"model":"local","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;

/// A chat stream whose usage chunk reports 10 prompt and 5 completion tokens.
const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-ops-s\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"o\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-ops-s\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"k\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-ops-s\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15}}\n\n",
    "data: [DONE]\n\n",
);

/// The mock's answer to a chat call: `CHAT_STREAM` in 3 chunks when streamed, else `CHAT_JSON`.
fn chat_reply(r: &Recorded) -> Reply {
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    if body["stream"] == true {
        let third = CHAT_STREAM.len() / 3;
        let (a, rest) = CHAT_STREAM.split_at(third);
        let (b, c) = rest.split_at(third);
        Reply::sse(
            [a, b, c]
                .into_iter()
                .map(|s| (ms(2), Bytes::copy_from_slice(s.as_bytes())))
                .collect(),
        )
    } else {
        Reply::json(200, CHAT_JSON)
    }
}

async fn send(req: reqwest::RequestBuilder) -> reqwest::Response {
    within(Duration::from_secs(10), "a request", async {
        req.send().await.expect("request")
    })
    .await
}

/// POSTs `body` to `url` and reads the whole answer: status, `x-request-id`, body.
async fn call(url: &str, body: &str) -> (u16, String, Bytes) {
    call_with(url, body, &[]).await
}

async fn call_with(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String, Bytes) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send(req).await;
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = within(Duration::from_secs(10), "reading an answer", resp.bytes())
        .await
        .expect("answer body");
    (status, id, body)
}

async fn get(url: &str) -> (u16, Bytes) {
    let resp = send(client().get(url)).await;
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body"))
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text exposition
// ---------------------------------------------------------------------------------------------

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scraped `/metrics` body, parsed.
struct Exposition {
    text: String,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("not a sample line: {l:?}")))
            .collect();
        Self { text, samples }
    }

    /// Samples of `name` carrying every pair of `labels` (and maybe more).
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples of `name` carrying every pair of `labels`; 0 when there is none.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .fold(0.0, |acc, s| acc + s.value)
    }

    /// The value of the one sample of `name` with `labels` (and maybe more); panics unless
    /// exactly one matches.
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one {name} series with {labels:?}: {found:#?}"
        );
        found[0].value
    }

    /// Every non-zero sample of `name`, keyed by the values of `keys` (in that order).
    fn by(&self, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.value != 0.0)
            .map(|s| {
                let k = keys
                    .iter()
                    .map(|k| s.labels.get(*k).cloned().unwrap_or_default())
                    .collect();
                (k, s.value)
            })
            .collect()
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end = loop {
            let (start, c) = chars.next()?;
            if c == '}' {
                break start + 1;
            }
            if c == ',' {
                continue;
            }
            let eq = r[start..].find('=')? + start;
            let key = r[start..eq].to_string();
            while chars.peek()?.0 <= eq {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        };
        rest = &r[end..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `GET /metrics` on the admin listener at `admin` (must be 200).
async fn scrape(admin: &str) -> Exposition {
    let (status, body) = get(&format!("{admin}/metrics")).await;
    assert_eq!(status, 200, "GET /metrics");
    Exposition::parse(String::from_utf8(body.to_vec()).expect("UTF-8 exposition"))
}

/// Scrapes until `done` holds (request counters are bumped just after the answer went out),
/// at most 5 s; returns the last scrape either way.
async fn scrape_until(admin: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(admin).await;
        if done(&m) || Instant::now() >= deadline {
            return m;
        }
        tokio::time::sleep(ms(20)).await;
    }
}

fn promtool_available() -> bool {
    Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pipes `text` to `promtool check metrics`, which must accept it. Without promtool on PATH
/// this only prints a note, unless `LLM_EDGE_REQUIRE_PROMTOOL=1` (CI) makes it a failure.
fn promtool_check(text: &str) {
    if !promtool_available() {
        if std::env::var("LLM_EDGE_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
            panic!("promtool not found on PATH and LLM_EDGE_REQUIRE_PROMTOOL=1");
        }
        eprintln!("note: promtool not on PATH; skipping `promtool check metrics`");
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\nstdout: {}\nstderr: {}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

const SECRET_ONE: &str = "sk-ops-one-3c8e1f7a92d4-Hn4p";
const SECRET_TWO: &str = "sk-ops-two-9a2b6d0e5f13-Jk8q";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_mixed_workload() {
    let mock = Mock::start(chat_reply);
    // `usage:` on: without it no tokens are counted at all (see
    // `tokens_are_counted_without_a_usage_section`).
    let proxy = Proxy::start(&format!(
        r#"
upstreams:
  v:
    kind: vllm
    endpoints: ["{}"]
    keys: [{{id: k1, key: "{SECRET_ONE}"}}, {{id: k2, key: "{SECRET_TWO}"}}]
models:
  - {{name: local, upstream: v}}
usage: {{}}
"#,
        mock.url()
    ));
    let url = proxy.url(CHAT);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, id, body) = call(&url, &chat_body("local")).await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(body, CHAT_JSON.as_bytes());
        ids.push(id);
    }
    for _ in 0..2 {
        let (status, id, body) = call(&url, &chat_body("no-such-model")).await;
        assert_eq!(status, 404, "{body:?}");
        ids.push(id);
    }
    let (status, id, body) = call(&url, r#"{"model":"local","messages":[}"#).await;
    assert_eq!(status, 400, "{body:?}");
    ids.push(id);
    for _ in 0..2 {
        let (status, id, body) = call(&url, &stream_body("local")).await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(body, CHAT_STREAM.as_bytes(), "the stream, as sent");
        ids.push(id);
    }
    assert_eq!(mock.requests().len(), 7, "7 calls reached the upstream");
    for id in &ids {
        assert!(
            id.starts_with("req_"),
            "every answer has a request id: {ids:?}"
        );
    }

    let m = scrape_until(&proxy.admin_url(""), |m| {
        m.sum("llm_edge_requests_total", &[]) >= 10.0
            && m.sum("llm_edge_active_requests", &[]) == 0.0
    })
    .await;

    let requests = m.by(
        "llm_edge_requests_total",
        &["kind", "model", "upstream", "status_class"],
    );
    let expected = BTreeMap::from([
        (s(&["api", "local", "v", "2xx"]), 7.0),
        (s(&["api", "-", "-", "4xx"]), 3.0),
    ]);
    assert_eq!(requests, expected, "requests by kind/model/upstream/class");
    let counts = m.by(
        "llm_edge_request_duration_seconds_count",
        &["kind", "upstream"],
    );
    let expected = BTreeMap::from([(s(&["api", "v"]), 7.0), (s(&["api", "-"]), 3.0)]);
    assert_eq!(counts, expected, "request duration histogram counts");
    assert_eq!(
        m.one(
            "llm_edge_request_duration_seconds_bucket",
            &[("kind", "api"), ("upstream", "v"), ("le", "+Inf")]
        ),
        7.0
    );

    let tokens = |direction| {
        m.sum(
            "llm_edge_tokens_total",
            &[
                ("direction", direction),
                ("model", "local"),
                ("upstream", "v"),
            ],
        )
    };
    assert_eq!(
        (tokens("in"), tokens("out")),
        (70.0, 35.0),
        "tokens of the 7 calls (5 JSON, 2 streamed):\n{}",
        m.text
    );
    assert_eq!(
        m.sum("llm_edge_tokens_total", &[]),
        105.0,
        "no tokens elsewhere"
    );

    assert_eq!(
        m.one("llm_edge_rejected_total", &[("reason", "bad_request")]),
        1.0
    );
    assert_eq!(
        m.sum("llm_edge_rejected_total", &[]),
        1.0,
        "nothing else rejected (an unknown model is not a rejection)"
    );
    assert_eq!(m.one("llm_edge_active_requests", &[]), 0.0);
    assert_eq!(m.one("llm_edge_active_streams", &[]), 0.0);
    assert_eq!(m.sum("llm_edge_upstream_retries_total", &[]), 0.0);
    for key in ["k1", "k2"] {
        for (state, v) in [("up", 1.0), ("cooling", 0.0), ("dead", 0.0)] {
            assert_eq!(
                m.one(
                    "llm_edge_key_state",
                    &[("upstream", "v"), ("key_id", key), ("state", state)]
                ),
                v,
                "key {key} {state}"
            );
        }
    }
    assert_eq!(
        m.one("llm_edge_upstream_ttfb_seconds_count", &[("upstream", "v")]),
        7.0
    );

    for secret in [SECRET_ONE, SECRET_TWO] {
        assert!(!m.text.contains(secret), "a secret in /metrics");
        assert!(
            !m.text.contains(&secret[secret.len() - 8..]),
            "part of a secret in /metrics"
        );
    }
    for id in &ids {
        assert!(!m.text.contains(id.as_str()), "request id {id} in /metrics");
    }
    assert!(
        !m.text.contains("no-such-model"),
        "a client-made model name"
    );

    promtool_check(&m.text);
}

/// Upstream `o` (openai, keys `a` then `b`, sequential) serves `m`: key `a` is rate limited.
/// Upstream `r` (vllm) serves `n` from the mock and from a port where nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_failovers_are_counted() {
    let mock = Mock::start(|r| {
        if r.header("authorization") == Some(&format!("Bearer {SECRET_ONE}")) {
            Reply::json(
                429,
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
            .header("retry-after", "60")
        } else {
            Reply::json(200, CHAT_JSON)
        }
    });
    let down = free_port();
    let proxy = Proxy::start(&format!(
        r#"
upstreams:
  o:
    kind: openai
    endpoints: ["{url}"]
    keys: [{{id: a, key: "{SECRET_ONE}"}}, {{id: b, key: "{SECRET_TWO}"}}]
    key_strategy: sequential
  r:
    kind: vllm
    endpoints: ["{url}", "http://127.0.0.1:{down}"]
models:
  - {{name: m, upstream: o}}
  - {{name: n, upstream: r}}
"#,
        url = mock.url()
    ));

    // Key `a` answers 429; the call is retried with `b` on the same replica.
    let (status, _, body) = call(&proxy.url(CHAT), &chat_body("m")).await;
    assert_eq!(status, 200, "{body:?}");
    let auth: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        auth,
        [
            format!("Bearer {SECRET_ONE}"),
            format!("Bearer {SECRET_TWO}")
        ]
    );

    // Round robin over two replicas: one of two calls meets the refused port first and goes
    // on to the other replica; the refused replica is then ejected, so it happens once.
    for _ in 0..2 {
        let (status, _, body) = call(&proxy.url(CHAT), &chat_body("n")).await;
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!(mock.requests().len(), 4);

    let m = scrape_until(&proxy.admin_url(""), |m| {
        m.sum("llm_edge_requests_total", &[]) >= 3.0
    })
    .await;
    let retries = m.by("llm_edge_upstream_retries_total", &["upstream", "reason"]);
    let expected = BTreeMap::from([
        (s(&["o", "rate_limited"]), 1.0),
        (s(&["r", "connect_error"]), 1.0),
    ]);
    assert_eq!(retries, expected, "retries by upstream and cause");
    // A failover is a retry that moved to another replica: not the key retry on `o`.
    let failovers = m.by("llm_edge_upstream_failovers_total", &["upstream", "reason"]);
    let expected = BTreeMap::from([(s(&["r", "connect_error"]), 1.0)]);
    assert_eq!(failovers, expected, "failovers by upstream and cause");
    let requests = m.by(
        "llm_edge_requests_total",
        &["kind", "model", "upstream", "status_class"],
    );
    let expected = BTreeMap::from([
        (s(&["api", "m", "o", "2xx"]), 1.0),
        (s(&["api", "n", "r", "2xx"]), 2.0),
    ]);
    assert_eq!(requests, expected);
    assert_eq!(
        m.one(
            "llm_edge_key_state",
            &[("upstream", "o"), ("key_id", "a"), ("state", "cooling")]
        ),
        1.0
    );
    assert_eq!(
        m.one(
            "llm_edge_key_state",
            &[("upstream", "o"), ("key_id", "b"), ("state", "up")]
        ),
        1.0
    );
    promtool_check(&m.text);
}

// ---------------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------------

const NGINX_COMBINED: &str =
    r#"^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"$"#;

/// Base64url of `{"session_name":"sess_123"}`.
const SLUG: &str = "eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9";

fn slug_path() -> String {
    format!("/meta/rllm1:{SLUG}{CHAT}")
}

/// Upstream `v` on `mock` serving `local`, the access log at `path`, and `extra` sections.
fn access_log_config(mock: &Mock, path: &Path, format: &str, extra: &str) -> String {
    format!(
        r#"
access_log: {{path: "{}", format: {format}}}
upstreams:
  v:
    kind: vllm
    endpoints: ["{}"]
models:
  - {{name: local, upstream: v}}
{extra}
"#,
        path.display(),
        mock.url()
    )
}

/// Polls `path` until it holds `n` complete lines (the writer is asynchronous), at most 5 s.
async fn log_lines(path: &Path, n: usize) -> Vec<String> {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    let complete = |t: &str| t.ends_with('\n') || t.is_empty();
    let ok = wait_until(Duration::from_secs(5), || {
        let t = read();
        complete(&t) && t.lines().count() >= n
    })
    .await;
    let text = read();
    assert!(ok, "{n} access log lines within 5 s; got:\n{text}");
    // Give a stray extra line a moment to show up too.
    tokio::time::sleep(ms(100)).await;
    let text = read();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), n, "exactly {n} lines:\n{text}");
    lines
}

/// The four requests both access log tests send; returns, per request, the request line
/// expected in the log, the status, the response body length and the `x-request-id`.
async fn four_requests(proxy: &Proxy) -> Vec<(String, u16, usize, String)> {
    let mut out = Vec::new();
    let (status, id, body) = call_with(
        &proxy.url(CHAT),
        &chat_body("local"),
        &[
            ("user-agent", r#"x "quoted""#),
            ("referer", "http://app.test/page"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    out.push((format!("POST {CHAT} HTTP/1.1"), status, body.len(), id));
    let (status, id, body) = call_with(
        &proxy.url(&slug_path()),
        &chat_body("local"),
        &[("user-agent", "ops-test/1")],
    )
    .await;
    assert_eq!(status, 200);
    out.push((format!("POST {CHAT} HTTP/1.1"), status, body.len(), id));
    let (status, id, body) = call_with(
        &proxy.url(CHAT),
        &chat_body("no-such-model"),
        &[("user-agent", "ops-test/1")],
    )
    .await;
    assert_eq!(status, 404);
    out.push((format!("POST {CHAT} HTTP/1.1"), status, body.len(), id));
    let resp = send(
        client()
            .get(proxy.url("/v1/models"))
            .header("user-agent", "ops-test/1"),
    )
    .await;
    let status = resp.status().as_u16();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = resp.bytes().await.unwrap();
    assert_eq!(status, 200);
    out.push(("GET /v1/models HTTP/1.1".into(), status, body.len(), id));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_combined_lines_parse_with_nginx_regex() {
    let dir = TempDir::new("access-combined");
    let path = dir.join("access.log");
    let mock = Mock::start(chat_reply);
    let proxy = Proxy::start(&access_log_config(&mock, &path, "combined", ""));
    let sent = four_requests(&proxy).await;

    let lines = log_lines(&path, 4).await;
    let re = Regex::new(NGINX_COMBINED).unwrap();
    let mut seen = Vec::new();
    for line in &lines {
        let c = re
            .captures(line)
            .unwrap_or_else(|| panic!("not nginx combined: {line}"));
        assert_eq!(&c[1], "127.0.0.1", "{line}");
        assert_eq!(&c[2], "-", "no client key with auth open: {line}");
        assert!(
            c[3].ends_with(" +0000") && c[3].len() == "10/Oct/2000:13:55:36 +0000".len(),
            "{line}"
        );
        assert!(
            !line.contains("rllm1") && !line.contains(SLUG),
            "slug in {line}"
        );
        seen.push((
            c[4].to_string(),
            c[5].parse::<u16>().unwrap(),
            c[6].parse::<usize>().unwrap(),
            c[7].to_string(),
            c[8].to_string(),
        ));
    }
    let mut expected: Vec<(String, u16, usize, String, String)> = sent
        .iter()
        .enumerate()
        .map(|(i, (request, status, len, _))| {
            let (referer, ua) = if i == 0 {
                ("http://app.test/page", r"x \x22quoted\x22")
            } else {
                ("-", "ops-test/1")
            };
            (request.clone(), *status, *len, referer.into(), ua.into())
        })
        .collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "request line, status, bytes, referer, UA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_json_lines_parse() {
    let dir = TempDir::new("access-json");
    let path = dir.join("access.log");
    let mock = Mock::start(chat_reply);
    // `usage:` on: without it no tokens are logged (see
    // `tokens_are_counted_without_a_usage_section`).
    let proxy = Proxy::start(&access_log_config(&mock, &path, "json", "usage: {}"));
    let sent = four_requests(&proxy).await;

    let lines = log_lines(&path, 4).await;
    let by_id: BTreeMap<String, Value> = lines
        .iter()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            (v["request_id"].as_str().expect("request_id").to_string(), v)
        })
        .collect();
    let ids: BTreeSet<&String> = sent.iter().map(|(_, _, _, id)| id).collect();
    assert_eq!(
        by_id.keys().collect::<BTreeSet<_>>(),
        ids,
        "one line per request, under the x-request-id the client got"
    );
    for line in &lines {
        assert!(
            !line.contains("rllm1") && !line.contains(SLUG),
            "slug in {line}"
        );
    }
    let line = |i: usize| &by_id[&sent[i].3];

    // The plain chat call.
    let v = line(0);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], CHAT);
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "api");
    assert_eq!(v["model"], "local");
    assert_eq!(v["upstream"], "v");
    assert_eq!(v["replica"], mock.addr().to_string());
    assert_eq!(v["client_addr"], "127.0.0.1");
    assert_eq!(v["bytes_in"], chat_body("local").len());
    assert_eq!(v["bytes_out"], sent[0].2);
    assert_eq!(v["session_name"], Value::Null);
    assert_eq!(v["user_agent"], r#"x "quoted""#);
    assert_eq!(v["referer"], "http://app.test/page");
    assert_eq!(v["retries"], 0);
    assert_eq!(v["error"], Value::Null);
    assert!(v["total_ms"].as_f64().is_some_and(|t| t >= 0.0), "{v}");
    assert!(v["upstream_ms"].as_f64().is_some_and(|t| t >= 0.0), "{v}");
    assert_eq!(
        (&v["tokens_in"], &v["tokens_out"]),
        (&10.into(), &5.into()),
        "{v}"
    );

    // Through the rLLM slug: routed on the stripped path, session named.
    let v = line(1);
    assert_eq!(v["path"], CHAT);
    assert_eq!(v["status"], 200);
    assert_eq!(v["session_name"], "sess_123");
    assert_eq!(v["model"], "local");
    assert_eq!(v["upstream"], "v");
    assert_eq!(
        (&v["tokens_in"], &v["tokens_out"]),
        (&10.into(), &5.into()),
        "{v}"
    );

    // An unknown model: the name the client sent, no upstream, the error code.
    let v = line(2);
    assert_eq!(v["status"], 404);
    assert_eq!(v["model"], "no-such-model");
    assert_eq!(v["upstream"], Value::Null);
    assert_eq!(v["error"], "model_not_found");
    assert_eq!(v["tokens_in"], Value::Null);

    // The model list, with its query.
    let v = line(3);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/v1/models");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "models");
    assert_eq!(v["bytes_out"], sent[3].2);

    assert_eq!(mock.requests().len(), 2);
    assert!(
        mock.requests().iter().all(|r| r.uri == CHAT),
        "the slug is stripped upstream too"
    );
}

/// Tokens reported by the upstream are counted in `/metrics` and the access log whether or
/// not usage accounting (`usage:`) or tracing is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_counted_without_a_usage_section() {
    let dir = TempDir::new("tokens-no-usage");
    let path = dir.join("access.log");
    let mock = Mock::start(chat_reply);
    let proxy = Proxy::start(&access_log_config(&mock, &path, "json", ""));
    let (status, _, body) = call(&proxy.url(CHAT), &chat_body("local")).await;
    assert_eq!(status, 200, "{body:?}");
    let (status, _, body) = call(&proxy.url(CHAT), &stream_body("local")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, CHAT_STREAM.as_bytes());

    let m = scrape_until(&proxy.admin_url(""), |m| {
        m.sum("llm_edge_requests_total", &[]) >= 2.0
    })
    .await;
    let tokens = |direction| {
        m.sum(
            "llm_edge_tokens_total",
            &[("direction", direction), ("model", "local")],
        )
    };
    assert_eq!(
        (tokens("in"), tokens("out")),
        (20.0, 10.0),
        "llm_edge_tokens_total"
    );
    for line in log_lines(&path, 2).await {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (&v["tokens_in"], &v["tokens_out"]),
            (&10.into(), &5.into()),
            "{v}"
        );
    }
}

/// The access log's path is the path as routed, on every route: the rLLM slug stripped and
/// the query kept, also for the model list and for requests llm-edge answers itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_strips_the_slug_and_keeps_the_query_on_every_route() {
    let dir = TempDir::new("access-routes");
    let path = dir.join("access.log");
    let mock = Mock::start(chat_reply);
    let proxy = Proxy::start(&access_log_config(&mock, &path, "json", ""));
    let slugged = |p: &str| format!("/meta/rllm1:{SLUG}{p}");
    let mut sent = Vec::new();
    for (path, status) in [
        ("/v1/models?limit=5".to_string(), 200),
        (slugged("/v1/models?limit=5"), 200),
        (slugged("/no/such/path?x=1"), 404),
        (slugged(&format!("{CHAT}?x=1")), 405),
    ] {
        let resp = send(client().get(proxy.url(&path))).await;
        assert_eq!(resp.status().as_u16(), status, "GET {path}");
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        sent.push((id, path.replace(&format!("/meta/rllm1:{SLUG}"), "")));
    }
    let lines = log_lines(&path, sent.len()).await;
    let logged: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["request_id"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = sent.into_iter().collect();
    assert_eq!(logged, expected, "path by request id");
}

// ---------------------------------------------------------------------------------------------
// Active health checks
// ---------------------------------------------------------------------------------------------

/// A replica that can be started on a given port (the mock always takes a free one), so a
/// "killed" replica can come back at the same address: `GET /health` answers 200, anything
/// else `CHAT_JSON`. Dropping it closes its listener and every connection.
struct Replica {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Replica {
    /// Starts on `127.0.0.1:port` (0: a free port). The port of a replica just dropped may
    /// still be held for a moment while its runtime winds down: binding is retried for 5 s.
    fn start(port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => std::thread::sleep(ms(20)),
                Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ops-replica")
            .enable_all()
            .build()
            .unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let (s, p) = (served.clone(), probes.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let (s, p) = (s.clone(), p.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let _ = req.into_body().collect().await;
                            let resp = if path == "/health" {
                                p.fetch_add(1, Ordering::SeqCst);
                                hyper::Response::new(Full::new(Bytes::from_static(b"ok")))
                            } else {
                                s.fetch_add(1, Ordering::SeqCst);
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(CHAT_JSON.as_bytes())))
                                    .unwrap()
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            served,
            probes,
            rt: Some(rt),
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `llm_edge_replica_healthy` of upstream `v` by replica address.
fn replica_health(m: &Exposition) -> BTreeMap<String, f64> {
    m.matching("llm_edge_replica_healthy", &[("upstream", "v")])
        .map(|s| (s.labels["replica"].clone(), s.value))
        .collect()
}

async fn wait_health(admin: &str, want: &BTreeMap<String, f64>, within_: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = replica_health(&scrape(admin).await);
        if &got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within_,
            "replica health {want:?} within {within_:?}; still {got:?}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_ejects_a_killed_replica_and_recovers_it() {
    let one = Replica::start(0);
    let two = Replica::start(0);
    let (a1, a2) = (one.addr.to_string(), two.addr.to_string());
    let proxy = Proxy::start(&format!(
        r#"
upstreams:
  v:
    kind: vllm
    endpoints: ["http://{a1}", "http://{a2}"]
    health_check: {{path: /health, interval: 100ms, timeout: 200ms, unhealthy_after: 2, healthy_after: 1}}
models:
  - {{name: m, upstream: v}}
"#
    ));
    let admin = proxy.admin_url("");
    let url = proxy.url(CHAT);
    let both_up = BTreeMap::from([(a1.clone(), 1.0), (a2.clone(), 1.0)]);
    wait_health(&admin, &both_up, Duration::from_secs(2)).await;
    assert!(
        wait_until(Duration::from_secs(2), || one.probes() > 0
            && two.probes() > 0)
        .await,
        "both replicas are probed on /health"
    );
    let (status, body) = get(&proxy.admin_url("/health/ready")).await;
    assert_eq!(status, 200, "{body:?}");
    for _ in 0..6 {
        let (status, _, body) = call(&url, &chat_body("m")).await;
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!((one.served(), two.served()), (3, 3), "round robin");

    // Kill replica two. No traffic meanwhile: only the active check can notice.
    drop(two);
    let took = wait_health(
        &admin,
        &BTreeMap::from([(a1.clone(), 1.0), (a2.clone(), 0.0)]),
        Duration::from_secs(2),
    )
    .await;
    eprintln!("killed replica marked unhealthy after {took:?}");
    for _ in 0..10 {
        let (status, _, body) = call(&url, &chat_body("m")).await;
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!(one.served(), 13, "every call went to the healthy replica");
    let m = scrape(&admin).await;
    assert_eq!(
        m.sum("llm_edge_upstream_retries_total", &[]),
        0.0,
        "no call was even tried on the dead replica"
    );
    let (status, body) = get(&proxy.admin_url("/health/ready")).await;
    assert_eq!(status, 200, "one healthy replica is enough: {body:?}");

    // Bring it back on the same port: it gets traffic again.
    let two = Replica::start(one_port(&a2));
    let took = wait_health(&admin, &both_up, Duration::from_secs(3)).await;
    eprintln!("restarted replica healthy again after {took:?}");
    let started = Instant::now();
    while two.served() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the restarted replica got no traffic within 3 s"
        );
        let (status, _, body) = call(&url, &chat_body("m")).await;
        assert_eq!(status, 200, "{body:?}");
    }
    let before = (one.served(), two.served());
    for _ in 0..4 {
        let (status, _, body) = call(&url, &chat_body("m")).await;
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!(
        (one.served() - before.0, two.served() - before.1),
        (2, 2),
        "round robin over both again"
    );

    // Every replica down: not ready, but alive.
    drop(one);
    drop(two);
    let none_up = BTreeMap::from([(a1.clone(), 0.0), (a2.clone(), 0.0)]);
    wait_health(&admin, &none_up, Duration::from_secs(2)).await;
    let (status, body) = get(&proxy.admin_url("/health/ready")).await;
    assert_eq!(status, 503, "{body:?}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "not_ready", "{v}");
    assert_eq!(
        v["upstreams"],
        serde_json::json!([{"upstream": "v", "replicas": 2, "healthy": 0}])
    );
    let (status, body) = get(&proxy.admin_url("/health/live")).await;
    assert_eq!(status, 200, "{body:?}");
}

fn one_port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Reloads: llm-edge started from a config file
// ---------------------------------------------------------------------------------------------

/// llm-edge run from a config file that the test rewrites; `POST /admin/reload` re-reads it.
/// The file is the fixed head (listeners, server, auth, admin) plus the test's body.
struct FileEdge {
    head: String,
    file: PathBuf,
    port: u16,
    admin: u16,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl FileEdge {
    fn start(dir: &TempDir, body: &str) -> Self {
        let port = free_port();
        let mut admin = free_port();
        while admin == port {
            admin = free_port();
        }
        let head = format!(
            "listen: [\"127.0.0.1:{port}\"]\nserver: {{threads: 2, pid_file: {:?}, upgrade_sock: {:?}}}\nshutdown: {{grace_period: 0s}}\nauth: {{mode: open}}\nadmin: {{listen: \"127.0.0.1:{admin}\"}}\n",
            dir.join("pid").display().to_string(),
            dir.join("upgrade.sock").display().to_string(),
        );
        let file = dir.join("llm-edge.yaml");
        std::fs::write(&file, format!("{head}{body}")).unwrap();
        let cfg = llm_edge::config::load_file(&file)
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
        let (stop, rx) = watch::channel(false);
        let opts = RunOptions {
            config_path: Some(file.clone()),
            ..Default::default()
        };
        let thread = std::thread::Builder::new()
            .name(format!("llm-edge-file-{port}"))
            .spawn(move || {
                EdgeServer::build(cfg, opts).run(RunArgs {
                    shutdown_signal: Box::new(StopWatch(rx)),
                })
            })
            .unwrap();
        let edge = Self {
            head,
            file,
            port,
            admin,
            stop,
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let up = |p: u16| {
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], p)), ms(200)).is_ok()
        };
        while !(up(port) && up(admin)) {
            assert!(
                !edge.thread.as_ref().unwrap().is_finished(),
                "llm-edge exited during start-up"
            );
            assert!(Instant::now() < deadline, "llm-edge did not start in 5 s");
            std::thread::sleep(ms(10));
        }
        edge
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    /// Rewrites the file with the same head and a new body.
    fn rewrite(&self, body: &str) {
        self.rewrite_raw(&format!("{}{body}", self.head));
    }

    /// Rewrites the whole file.
    fn rewrite_raw(&self, text: &str) {
        std::fs::write(&self.file, text).unwrap();
    }

    /// `POST /admin/reload`.
    async fn reload(&self) -> reqwest::Response {
        send(client().post(self.admin_url("/admin/reload"))).await
    }

    /// `POST /admin/reload`, which must succeed with nothing needing a restart.
    async fn reload_ok(&self) {
        let resp = self.reload().await;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "reload: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "reloaded", "needs_restart": []})
        );
    }

    /// The `/admin/keys` entry of key `id` of upstream `upstream`.
    async fn key(&self, upstream: &str, id: &str) -> Value {
        let (status, body) = get(&self.admin_url("/admin/keys")).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["upstream"] == upstream)
            .and_then(|u| u["keys"].as_array().unwrap().iter().find(|k| k["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no key {upstream}/{id} in {v}"))
    }
}

impl Drop for FileEdge {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// 19 content events and `data: [DONE]`: 20 chunks.
fn slow_stream_chunks() -> Vec<String> {
    let mut chunks: Vec<String> = (0..19)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-slow\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i:02}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        })
        .collect();
    chunks.push("data: [DONE]\n\n".into());
    chunks
}

fn reload_config(models: &str, a: &Mock, b: &Mock) -> String {
    format!(
        r#"
upstreams:
  ua:
    kind: vllm
    endpoints: ["{}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 60s}}
  ub:
    kind: vllm
    endpoints: ["{}"]
models:
{models}
"#,
        a.url(),
        b.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_open_streams_and_switches_routes() {
    const STREAMS: usize = 50;
    let chunks = slow_stream_chunks();
    let expected: String = chunks.concat();
    let a = Mock::replying(Reply::sse(
        chunks
            .iter()
            .map(|c| (ms(50), Bytes::from(c.clone())))
            .collect(),
    ));
    let b = Mock::replying(Reply::json(200, CHAT_JSON));
    let dir = TempDir::new("reload-load");
    let edge = FileEdge::start(&dir, &reload_config("  - {name: a, upstream: ua}", &a, &b));

    let http = client();
    let opened: Vec<_> = (0..STREAMS)
        .map(|_| {
            let req = http
                .post(edge.url(CHAT))
                .header("content-type", "application/json")
                .body(stream_body("a"));
            tokio::spawn(async move {
                let resp = req.send().await.expect("open a stream");
                let status = resp.status().as_u16();
                let body = resp.bytes().await;
                (status, body, Instant::now())
            })
        })
        .collect();
    a.wait_stream(STREAMS, Duration::from_secs(10)).await;
    let m = scrape(&edge.admin_url("")).await;
    assert_eq!(m.one("llm_edge_active_streams", &[]), STREAMS as f64);

    // While they are open: `b` appears (on upstream ub), `a` goes.
    edge.rewrite(&reload_config("  - {name: b, upstream: ub}", &a, &b));
    edge.reload_ok().await;
    let reloaded = Instant::now();
    let open = a.streams().iter().filter(|s| s.end().is_none()).count();
    assert_eq!(open, STREAMS, "every stream was still open at the reload");

    let (status, _, body) = call(&edge.url(CHAT), &chat_body("b")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, CHAT_JSON.as_bytes());
    assert_eq!(b.requests().len(), 1, "the new route reaches upstream ub");
    let resp = send(
        client()
            .post(edge.url(CHAT))
            .header("content-type", "application/json")
            .body(chat_body("a")),
    )
    .await;
    assert_error(resp, 404, "model_not_found").await;
    assert_eq!(a.requests().len(), STREAMS, "nothing new went to ua");

    for (i, task) in opened.into_iter().enumerate() {
        let (status, body, done) = within(Duration::from_secs(15), "an open stream", task)
            .await
            .unwrap();
        let body = body.unwrap_or_else(|e| panic!("stream {i} failed: {e}"));
        assert_eq!(status, 200, "stream {i}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            expected,
            "stream {i}: every chunk and [DONE]"
        );
        assert!(done > reloaded, "stream {i} ended after the reload");
    }
    for (i, s) in a.streams().iter().enumerate() {
        let end = s.wait_end(Duration::from_secs(5)).await;
        assert_eq!(
            end.map(|e| e.1),
            Some(StreamEnd::Completed),
            "upstream stream {i}"
        );
        assert_eq!(s.emitted().len(), 20, "upstream stream {i}");
    }

    let m = scrape_until(&edge.admin_url(""), |m| {
        m.sum("llm_edge_requests_total", &[]) >= (STREAMS + 2) as f64
    })
    .await;
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "error")]),
        0.0
    );
    assert_eq!(m.one("llm_edge_active_streams", &[]), 0.0);
    assert_eq!(
        m.by(
            "llm_edge_requests_total",
            &["kind", "model", "upstream", "status_class"]
        ),
        BTreeMap::from([
            (s(&["api", "a", "ua", "2xx"]), STREAMS as f64),
            (s(&["api", "b", "ub", "2xx"]), 1.0),
            (s(&["api", "-", "-", "4xx"]), 1.0),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_running_config() {
    let a = Mock::replying(Reply::json(200, CHAT_JSON));
    let b = Mock::replying(Reply::json(200, CHAT_JSON));
    let dir = TempDir::new("reload-invalid");
    let edge = FileEdge::start(&dir, &reload_config("  - {name: a, upstream: ua}", &a, &b));

    // Model `b` added, but with a key llm-edge does not know: nothing of it applies.
    edge.rewrite(&format!(
        "{}  - {{name: b, upstream: ub, colour: blue}}\n",
        reload_config("  - {name: a, upstream: ua}", &a, &b)
    ));
    let body = assert_error(edge.reload().await, 400, "bad_request").await;
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("colour"),
        "the message names the unknown key: {msg}"
    );
    assert!(msg.contains("models[1]"), "and where it is: {msg}");

    let (status, _, body) = call(&edge.url(CHAT), &chat_body("a")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(a.requests().len(), 1);
    let (status, _, _) = call(&edge.url(CHAT), &chat_body("b")).await;
    assert_eq!(status, 404, "model b was not applied");
    assert_eq!(b.requests().len(), 0);

    let m = scrape(&edge.admin_url("")).await;
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "error")]),
        1.0
    );
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "ok")]),
        0.0
    );

    // Not YAML at all: refused the same way.
    edge.rewrite_raw("listen: [\"127.0.0.1:1\"\nupstreams: {{{{ not yaml\n");
    let body = assert_error(edge.reload().await, 400, "bad_request").await;
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("reload refused: "), "{msg}");
    let (status, _, body) = call(&edge.url(CHAT), &chat_body("a")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(a.requests().len(), 2);
    let m = scrape(&edge.admin_url("")).await;
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "error")]),
        2.0
    );
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "ok")]),
        0.0
    );
}

const KEY_A_OLD: &str = "sk-ops-alpha-0e4c7b1d93a2-Wm1r";
const KEY_A_NEW: &str = "sk-ops-alpha-5b9f2e8c16d7-Xn2s";
const KEY_B: &str = "sk-ops-bravo-7d3a0f6e28b9-Yp3t";

fn keys_config(mock: &Mock, key_a: &str, extra_model: &str) -> String {
    format!(
        r#"
upstreams:
  o:
    kind: openai
    endpoints: ["{}"]
    keys: [{{id: a, key: "{key_a}"}}, {{id: b, key: "{KEY_B}"}}]
    key_strategy: sequential
models:
  - {{name: m, upstream: o}}
{extra_model}
"#,
        mock.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_cooldowns_survive_a_reload() {
    // Key `a` (its old secret) is rate limited for a minute; anything else is served.
    let mock = Mock::start(|r| {
        if r.header("authorization") == Some(&format!("Bearer {KEY_A_OLD}")) {
            Reply::json(
                429,
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
            .header("retry-after", "60")
        } else {
            Reply::json(200, CHAT_JSON)
        }
    });
    let dir = TempDir::new("reload-keys");
    let edge = FileEdge::start(&dir, &keys_config(&mock, KEY_A_OLD, ""));
    let used = |from: usize| -> Vec<String> {
        mock.requests()[from..]
            .iter()
            .map(|r| r.header("authorization").unwrap().to_string())
            .collect()
    };

    let (status, _, body) = call(&edge.url(CHAT), &chat_body("m")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(
        used(0),
        [format!("Bearer {KEY_A_OLD}"), format!("Bearer {KEY_B}")]
    );
    let a = edge.key("o", "a").await;
    assert_eq!(a["state"], "cooling", "{a}");
    assert_eq!(edge.key("o", "b").await["state"], "up");

    // Same keys, one more model: the cooldown carries over.
    edge.rewrite(&keys_config(
        &mock,
        KEY_A_OLD,
        "  - {name: m2, upstream: o}",
    ));
    edge.reload_ok().await;
    let a = edge.key("o", "a").await;
    assert_eq!(
        a["state"], "cooling",
        "after a reload with the same keys: {a}"
    );
    let left = a["cooldown_remaining_ms"].as_u64().unwrap();
    assert!((50_000..=60_000).contains(&left), "{a}");
    let (status, models) = get(&edge.url("/v1/models")).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&models).contains(r#""id":"m2""#),
        "the reloaded config is in use: {models:?}"
    );
    // Cooldowns are per model: `m` still avoids `a`.
    let (status, _, body) = call(&edge.url(CHAT), &chat_body("m")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(
        used(2),
        [format!("Bearer {KEY_B}")],
        "the cooling key is skipped"
    );
    let m = scrape(&edge.admin_url("")).await;
    assert_eq!(
        m.one(
            "llm_edge_key_state",
            &[("upstream", "o"), ("key_id", "a"), ("state", "cooling")]
        ),
        1.0
    );

    // Same id, new secret: a new key, up at once.
    edge.rewrite(&keys_config(
        &mock,
        KEY_A_NEW,
        "  - {name: m2, upstream: o}",
    ));
    edge.reload_ok().await;
    let a = edge.key("o", "a").await;
    assert_eq!(a["state"], "up", "a new secret under the same id: {a}");
    assert_eq!(a["cooldown_remaining_ms"], 0, "{a}");
    let m = scrape(&edge.admin_url("")).await;
    assert_eq!(
        m.one(
            "llm_edge_key_state",
            &[("upstream", "o"), ("key_id", "a"), ("state", "up")]
        ),
        1.0
    );
    assert_eq!(
        m.one("llm_edge_config_reloads_total", &[("result", "ok")]),
        2.0
    );
    let (status, _, body) = call(&edge.url(CHAT), &chat_body("m")).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(
        used(3),
        [format!("Bearer {KEY_A_NEW}")],
        "key a serves again"
    );
}
