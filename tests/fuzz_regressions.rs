//! Inputs from the `cargo fuzz` targets in `fuzz/` (see docs/fuzzing.md), each run on the same
//! library function as its target, on the exact bytes, asserting the fixed behaviour; and
//! hostile inputs per target (deep nesting, invalid UTF-8, huge slugs, CR/CRLF framing, a
//! YAML alias bomb) with the behaviour they get.
//!
//! Every finding is fixed; each test asserts the behaviour wanted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use llm_edge::config::{from_yaml_str, RouteConfig};
use llm_edge::error::EdgeError;
use llm_edge::observe::sse::SseSplitter;
use llm_edge::observe::usage::UsageScanner;
use llm_edge::route::api::{classify, ApiEndpoint, ApiPath};
use llm_edge::route::slug::{decode_slug, encode_slug, extract, DEFAULT_MAX_SLUG};
use llm_edge::route::table::rewrite_path;
use llm_edge::shaping::body::{Edit, TopLevel};
use llm_edge::shaping::sampling::{plan, Action, FieldPath, Policy};
use llm_edge::trace::accumulate::{Accumulator, Flavor};
use llm_edge::trace::record::Tokens;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

fn utf8(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
}

// ---- slug ----------------------------------------------------------------------------------

/// fuzz `slug`: `slug_of` sliced `segment[..8]` to look for `rllm1%3a`, which panics when a
/// multi-byte character straddles byte 8 of any `/meta/` segment. `http` accepts raw UTF-8
/// in paths, so any client could send this.
#[test]
fn meta_segment_with_a_multibyte_char_at_byte_8_is_not_a_panic() {
    let path = utf8(b"/meta/rl1:eio\xc3\xa9");
    let m = extract(path, DEFAULT_MAX_SLUG).unwrap();
    assert_eq!(m.path, path);
    assert!(!m.has_metadata());
    // The same shape next to the percent-encoded prefix.
    let path = "/meta/rllm1%3\u{e9}/v1/chat/completions";
    assert_eq!(extract(path, DEFAULT_MAX_SLUG).unwrap().path, path);
    let m = extract("/meta/RLLM1%3ae30/v1/models", DEFAULT_MAX_SLUG).unwrap();
    assert_eq!(m.path, "/v1/models");
    assert_eq!(m.metadata, Some(Map::new()));
}

#[test]
fn huge_slug_is_refused_by_length_before_decoding() {
    let slug = "e".repeat(1 << 20);
    let e = extract(
        &format!("/meta/rllm1:{slug}/v1/chat/completions"),
        DEFAULT_MAX_SLUG,
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.message().contains("over the limit of 65536"), "{e:?}");
    // Under a limit that lets it through, it decodes to bytes that are not UTF-8.
    let e = decode_slug(&slug, usize::MAX).unwrap_err();
    assert_eq!(e.message(), "rLLM metadata slug is not UTF-8");
}

#[test]
fn session_id_that_decodes_to_invalid_utf8_is_a_bad_request() {
    let e = extract("/sessions/%ff%fe/v1/chat/completions", DEFAULT_MAX_SLUG).unwrap_err();
    assert_eq!(e.message(), "session id is not UTF-8");
    let m = extract("/sessions/a%2Fb/v1/models", DEFAULT_MAX_SLUG).unwrap();
    assert_eq!(m.session_id.as_deref(), Some("a/b"));
}

#[test]
fn deeply_nested_slug_json_is_a_bad_request() {
    let json = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let slug = URL_SAFE_NO_PAD.encode(json);
    let e = decode_slug(&slug, usize::MAX).unwrap_err();
    assert!(e.message().contains("recursion limit exceeded"), "{e:?}");
}

/// fuzz `slug`: a float re-read after `encode_slug` is not always the same float: serde_json
/// without its `float_roundtrip` feature parses `2.6666666666666666e25` (what it writes for
/// this number) one unit in the last place away from the number it read first.
#[test]
fn slug_floats_survive_a_round_trip() {
    let Value::Object(meta) =
        serde_json::from_slice(br#"{"":[26666666666666666666666666]}"#).unwrap()
    else {
        unreachable!()
    };
    let slug = encode_slug(&meta);
    let back = decode_slug(slug.strip_prefix("rllm1:").unwrap(), usize::MAX).unwrap();
    assert_eq!(back, meta);
}

// ---- classify ------------------------------------------------------------------------------

#[test]
fn classify_matches_exact_paths_only() {
    assert_eq!(
        classify("/v1/messages/count_tokens"),
        ApiPath::Call(ApiEndpoint::CountTokens)
    );
    let long = format!("/v1/{}", "a".repeat(100_000));
    for other in [
        long.as_str(),
        "/v1/models?x=1",
        "/V1/models",
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/",
        "",
    ] {
        assert_eq!(classify(other), ApiPath::Other, "{other:?}");
    }
}

#[test]
fn rewrite_path_with_multibyte_prefixes() {
    let route = |prefix: &str| RouteConfig {
        prefix: prefix.to_string(),
        upstream: "u".to_string(),
        strip_prefix: true,
    };
    assert_eq!(rewrite_path(&route("/é/"), "/é/v1/x?q=é"), "/v1/x?q=é");
    assert_eq!(rewrite_path(&route("/é"), "/é"), "/");
    // A prefix that does not match (or is longer than the path) leaves the path as it was.
    assert_eq!(rewrite_path(&route("/éé/"), "/é"), "/é");
    assert_eq!(rewrite_path(&route("é"), "é/x"), "/x");
}

// ---- body_edit -----------------------------------------------------------------------------

/// The fuzz target's policy: two rules inside `stream_options`.
fn stream_options_policy() -> Policy {
    let rule = |f: &str, a: Action| (FieldPath::parse(f).unwrap(), a);
    Policy {
        rules: vec![
            rule("temperature", Action::Drop),
            rule("logprobs", Action::SetIfAbsent(json!(true))),
            rule("top_logprobs", Action::Override(json!(5))),
            rule("metadata.a", Action::Drop),
            rule(
                "stream_options.include_usage",
                Action::Override(json!(true)),
            ),
            rule(
                "stream_options.continuous_usage_stats",
                Action::SetIfAbsent(json!(true)),
            ),
        ],
    }
}

/// fuzz `body_edit` (its first seed): each `stream_options.*` rule planned its own edit of
/// `stream_options`, so the body got `"stream_options"` twice (absent from the request) or the
/// last edit won (present): only the last rule took effect. Reachable from config: usage
/// accounting adds `stream_options.include_usage` next to an operator's
/// `stream_options.continuous_usage_stats`.
#[test]
fn two_rules_inside_one_object_both_apply() {
    let policy = stream_options_policy();
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.7}"#;
    let top = TopLevel::parse(body).unwrap();
    let planned = plan(&top, &policy, true);
    let out = top.apply(&planned.edits);
    let shaped = TopLevel::parse(&out).unwrap();
    assert_eq!(
        shaped.keys().filter(|k| *k == "stream_options").count(),
        1,
        "{}",
        utf8(&out)
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["stream_options"],
        json!({"include_usage": true, "continuous_usage_stats": true})
    );
    assert!(v.get("temperature").is_none());
    assert_eq!(
        planned.injected,
        [
            "logprobs",
            "top_logprobs",
            "stream_options.include_usage",
            "stream_options.continuous_usage_stats"
        ]
    );

    // The client's own object: both rules still apply, its keys are kept.
    let body = br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#;
    let top = TopLevel::parse(body).unwrap();
    let out = top.apply(&plan(&top, &policy, true).edits);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["stream_options"],
        json!({"x": 1, "include_usage": true, "continuous_usage_stats": true})
    );
}

/// fuzz `body_edit`: a `metadata.*` (or `stream_options.*`) rule re-serialises the client's
/// object through `serde_json::Value`; without serde_json's `float_roundtrip` feature a number
/// can come back 1 ULP off (and an integer past 64 bits is rewritten as a float either way).
#[test]
fn numbers_next_to_a_dropped_sub_field_keep_their_value() {
    let policy = stream_options_policy();
    let body =
        br#"{"model":"q","metadata":{"a":1,"b":2777777777777777777777777700000000000000000}}"#;
    let top = TopLevel::parse(body).unwrap();
    let out = top.apply(&plan(&top, &policy, false).edits);
    let before: Value = serde_json::from_slice(body).unwrap();
    let after: Value = serde_json::from_slice(&out).unwrap();
    assert!(after["metadata"].get("a").is_none());
    assert_eq!(after["metadata"]["b"], before["metadata"]["b"]);
}

#[test]
fn deeply_nested_bodies() {
    // 100k `[`: not an object.
    let e = TopLevel::parse("[".repeat(100_000).as_bytes()).unwrap_err();
    assert!(matches!(e, EdgeError::InvalidJson(_)), "{e:?}");
    // Nested 100k deep inside a value: top-level parsing skips values without recursing, so
    // the body is accepted and edited; its untouched bytes are kept.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let body = format!(r#"{{"model":"m","a":{deep}}}"#);
    let top = TopLevel::parse(body.as_bytes()).unwrap();
    let out = top.apply(&[Edit::Set("model", "\"n\"".into())]);
    assert_eq!(out, format!(r#"{{"model":"n","a":{deep}}}"#).into_bytes());
    // (serde_json::Value itself refuses it: recursion limit.)
    assert!(serde_json::from_slice::<Value>(&out).is_err());
    // An unterminated one is invalid.
    let body = format!(r#"{{"a":{}}}"#, "[".repeat(100_000));
    assert!(matches!(
        TopLevel::parse(body.as_bytes()),
        Err(EdgeError::InvalidJson(_))
    ));
}

#[test]
fn invalid_utf8_bodies_are_invalid_json() {
    for body in [
        &b"{\"model\":\"\xff\"}"[..],
        b"{\"\xc3\":1}",
        b"{\"a\":[\"\xed\xa0\x80\"]}",
        b"\xef\xbb\xbf{}",
    ] {
        assert!(
            matches!(TopLevel::parse(body), Err(EdgeError::InvalidJson(_))),
            "{body:?}"
        );
    }
}

#[test]
fn duplicate_keys_are_all_edited() {
    let top = TopLevel::parse(br#"{"a":1,"b":2,"a":3}"#).unwrap();
    assert_eq!(top.get("a").unwrap().get(), "3");
    assert_eq!(top.apply(&[Edit::Remove("a")]), br#"{"b":2}"#.to_vec());
    assert_eq!(
        top.apply(&[Edit::Set("a", "0".into())]),
        br#"{"a":0,"b":2,"a":0}"#.to_vec()
    );
}

// ---- sse -----------------------------------------------------------------------------------

/// fuzz `sse` (seed `big_numbers`): token counts near `u64::MAX` overflowed the sums
/// (`input + cache reads + cache writes`, `prompt + completion`): a panic with overflow checks,
/// a wrapped (tiny) total without. They saturate now.
#[test]
fn huge_token_counts_saturate() {
    let stream = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":18446744073709551615,\"cache_read_input_tokens\":0,\"output_tokens\":0}}}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1}}\n\n";
    let max = u64::MAX;
    let mut scanner = UsageScanner::new(true);
    scanner.feed(stream);
    assert_eq!(
        scanner.finish(),
        Some(Tokens {
            prompt: max,
            completion: 1,
            total: max,
            cached: Some(0)
        })
    );
    for flavor in [Flavor::Chat, Flavor::Anthropic] {
        let mut acc = Accumulator::new(flavor);
        acc.feed_sse(stream);
        let u = acc.usage().unwrap();
        assert_eq!((u.prompt, u.total), (max, max), "{flavor:?}");
    }
    let mut acc = Accumulator::new(Flavor::Anthropic);
    acc.feed_json(br#"{"usage":{"input_tokens":18446744073709551615,"cache_creation_input_tokens":5,"output_tokens":7}}"#);
    acc.finish_json();
    assert_eq!(acc.usage().unwrap().total, max);
    let mut scanner = UsageScanner::new(false);
    scanner.feed(br#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":9}}"#);
    assert_eq!(scanner.finish().unwrap().prompt, max);
}

fn events(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
    let mut s = SseSplitter::new();
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, |e| {
            out.push((
                e.event.as_deref().map(str::to_string),
                e.text().into_owned(),
            ))
        });
    }
    out
}

const USAGE_EVENT: &str = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;

#[test]
fn crlf_framing_in_any_chunking() {
    let stream =
        format!("event: a\r\ndata: 1\r\ndata: 2\r\n\r\n: c\r\n\r\ndata: {USAGE_EVENT}\r\n\r\n");
    let bytes = stream.as_bytes();
    let want = vec![
        (Some("a".to_string()), "1\n2".to_string()),
        (None, USAGE_EVENT.to_string()),
    ];
    assert_eq!(events(&[bytes]), want);
    assert_eq!(events(&bytes.chunks(1).collect::<Vec<_>>()), want);
    let mut scanner = UsageScanner::new(true);
    bytes.chunks(3).for_each(|c| scanner.feed(c));
    assert_eq!(scanner.finish().unwrap().total, 8);
}

#[test]
fn cr_only_framing_splits_events() {
    let stream = format!("data: 1\r\rdata: {USAGE_EVENT}\r\r");
    let bytes = stream.as_bytes();
    let want = vec![(None, "1".to_string()), (None, USAGE_EVENT.to_string())];
    assert_eq!(events(&[bytes]), want);
    assert_eq!(events(&bytes.chunks(1).collect::<Vec<_>>()), want);
    let mut acc = Accumulator::new(Flavor::Chat);
    acc.feed_sse(bytes);
    assert_eq!(acc.usage().unwrap().total, 8);
}

/// The usage scanner ends events on `\n\n` and `\r\n\r\n` only, so a CR-only stream (legal
/// SSE, sent by no LLM server we know of) reports no usage while the trace of the same stream
/// has it (the splitter in `observe::sse` knows `\r\r`).
#[test]
fn cr_only_framing_reports_usage() {
    let stream = format!("data: {USAGE_EVENT}\r\r");
    let mut scanner = UsageScanner::new(true);
    scanner.feed(stream.as_bytes());
    assert_eq!(scanner.finish().unwrap().total, 8);
}

#[test]
fn invalid_utf8_in_events_is_replaced_not_fatal() {
    let stream = b"event: \xff\ndata: \xc3\n\ndata: {\"id\":\"\xff\"}\n\n";
    let evs = events(&[stream]);
    assert_eq!(
        evs,
        vec![
            (Some("\u{fffd}".to_string()), "\u{fffd}".to_string()),
            (None, "{\"id\":\"\u{fffd}\"}".to_string()),
        ]
    );
    let mut acc = Accumulator::new(Flavor::Chat);
    acc.feed_sse(stream);
    assert_eq!(acc.response_id.as_deref(), Some("\u{fffd}"));
}

// ---- config --------------------------------------------------------------------------------

#[test]
fn yaml_alias_bomb_is_refused_quickly() {
    // Nine levels of nine aliases: 9^9 (387 million) strings if expanded, inside a field that
    // takes any JSON value.
    let mut yaml = String::from(
        "upstreams:\n  u:\n    kind: vllm\n    endpoints: ['http://127.0.0.1:1']\n    sampling:\n      set_if_absent:\n        l0: &l0 [x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..=8 {
        let prev = format!("*l{}", i - 1);
        yaml.push_str(&format!(
            "        l{i}: &l{i} [{}]\n",
            [prev.as_str(); 9].join(", ")
        ));
    }
    let started = Instant::now();
    let e = from_yaml_str(&yaml, &no_env).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        e.problems.iter().any(|p| p.contains("repetition limit")),
        "{e:?}"
    );
}

/// Nesting past serde_yaml's recursion limit (128) is an error; where the schema wants
/// something else, the type error comes first. Only 2,000 levels here: libyaml's flow-level
/// bookkeeping makes parsing quadratic in the depth (see docs/fuzzing.md).
#[test]
fn deeply_nested_yaml_is_an_error() {
    let depth = 2_000;
    let problem = |text: String| {
        let e = from_yaml_str(&text, &no_env).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e:?}");
        e.problems[0].clone()
    };
    assert_eq!(
        problem("[".repeat(depth)),
        "invalid type: sequence, expected struct RawConfig"
    );
    // `listen` entries are a string or an object, so the parser descends before refusing.
    let p = problem(format!("listen: {}", "[".repeat(depth)));
    assert!(
        p.starts_with("listen[0]") && p.contains("recursion limit exceeded"),
        "{p}"
    );
    let p = problem(format!(
        "upstreams: {{u: {{kind: vllm, endpoints: ['http://h'], sampling: {{set_if_absent: {{a: {}{}}}}}}}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    ));
    assert!(
        p.starts_with("upstreams.u.sampling.set_if_absent.a[0][0]"),
        "{p}"
    );
    assert!(
        p.ends_with(": recursion limit exceeded at line 1 column 207"),
        "{p}"
    );
}

/// fuzz `config`: a duration too large for `Duration` (about 584 billion years) panics in
/// `Duration::from_secs_f64` instead of being refused. Both the string form (`units.rs`
/// `parse_duration`) and a YAML float (`DurationVisitor::visit_f64`) reach it; the fuzzer's
/// input was `retries: {deadline: 177777777777777777770s}`.
#[test]
fn huge_durations_are_refused() {
    for v in ["177777777777777777770s", "1e20", "99999999999999999999h"] {
        let yaml = format!("server: {{grace_period: {v}}}\n");
        let e = from_yaml_str(&yaml, &no_env).unwrap_err();
        assert!(
            e.problems.iter().any(|p| p.contains("grace_period")),
            "{e:?}"
        );
    }
}
