//! Writes a trace record as JSON, byte for byte what serde_json writes for it, at about a
//! third of the cost: keys are written as constants instead of being escaped one byte at a
//! time, and strings are escaped a run at a time (the search for a byte to escape is the
//! chunk scanner's). Traced calls write one record each, on the writer thread of the
//! proxy's process, so this is part of what tracing costs a call.

use super::chunk::find_stop;
use super::record::{
    ChoiceOutput, ReplyMessage, TokenIds, Tokens, TraceInput, TraceOutput, TraceRecord,
};
use serde::Serialize;
use serde_json::{Map, Value};

/// Appends `rec` to `out` as one JSON object (no newline).
pub fn write_record(out: &mut Vec<u8>, rec: &TraceRecord) {
    // Destructured without `..`: a new field fails to compile here until it is written.
    let TraceRecord {
        trace_id,
        request_id,
        name,
        timestamp,
        latency_ms,
        ttft_ms,
        route,
        model,
        upstream_model,
        upstream,
        replica,
        session_name,
        session_uids,
        metadata,
        input,
        output,
        tokens,
        stream,
        status,
        error,
    } = rec;
    out.extend_from_slice(b"{\"trace_id\":");
    string(out, trace_id);
    out.extend_from_slice(b",\"request_id\":");
    string(out, request_id);
    out.extend_from_slice(b",\"name\":");
    string(out, name);
    out.extend_from_slice(b",\"timestamp\":");
    value(out, timestamp);
    out.extend_from_slice(b",\"latency_ms\":");
    value(out, latency_ms);
    out.extend_from_slice(b",\"ttft_ms\":");
    value(out, ttft_ms);
    out.extend_from_slice(b",\"route\":");
    string(out, route);
    out.extend_from_slice(b",\"model\":");
    string(out, model);
    out.extend_from_slice(b",\"upstream_model\":");
    string(out, upstream_model);
    out.extend_from_slice(b",\"upstream\":");
    string(out, upstream);
    out.extend_from_slice(b",\"replica\":");
    opt_string(out, replica.as_deref());
    out.extend_from_slice(b",\"session_name\":");
    opt_string(out, session_name.as_deref());
    out.extend_from_slice(b",\"session_uids\":[");
    for (i, uid) in session_uids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, uid);
    }
    out.extend_from_slice(b"],\"metadata\":");
    map(out, metadata);
    out.extend_from_slice(b",\"input\":");
    write_input(out, input);
    out.extend_from_slice(b",\"output\":");
    write_output(out, output);
    out.extend_from_slice(b",\"tokens\":");
    write_tokens(out, tokens);
    out.extend_from_slice(if *stream {
        b",\"stream\":true,\"status\":"
    } else {
        b",\"stream\":false,\"status\":"
    });
    int(out, u64::from(*status));
    out.extend_from_slice(b",\"error\":");
    opt_string(out, error.as_deref());
    out.push(b'}');
}

fn write_input(out: &mut Vec<u8>, input: &TraceInput) {
    let TraceInput {
        messages,
        prompt,
        input,
        prompt_token_ids,
    } = input;
    out.push(b'{');
    // The request's parts are kept raw (serde_json writes a RawValue's text as it is).
    for (key, raw) in [
        (&b"\"messages\":"[..], messages),
        (b"\"prompt\":", prompt),
        (b"\"input\":", input),
    ] {
        if let Some(raw) = raw {
            out.extend_from_slice(key);
            out.extend_from_slice(raw.get().as_bytes());
            out.push(b',');
        }
    }
    out.extend_from_slice(b"\"prompt_token_ids\":");
    match prompt_token_ids {
        TokenIds::Values(v) => ints(out, v),
        TokenIds::Text(t) => out.extend_from_slice(t.as_bytes()),
    }
    out.push(b'}');
}

fn write_output(out: &mut Vec<u8>, output: &TraceOutput) {
    let TraceOutput {
        message,
        finish_reason,
        output_token_ids,
        rollout_logprobs,
        choices,
    } = output;
    out.push(b'{');
    let top = out.len();
    write_reply(
        out,
        message.as_ref(),
        finish_reason,
        output_token_ids,
        rollout_logprobs,
    );
    let top = top..out.len();
    out.extend_from_slice(b",\"choices\":[");
    for (i, c) in choices.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // The top-level reply is choice 0's: its text is copied rather than written again
        // (comparing is cheaper than escaping the reply a second time).
        if i == 0
            && Some(&c.message) == message.as_ref()
            && c.finish_reason == *finish_reason
            && c.output_token_ids == *output_token_ids
            && c.rollout_logprobs == *rollout_logprobs
        {
            out.extend_from_slice(b"{\"index\":");
            int(out, c.index);
            out.push(b',');
            out.extend_from_within(top.clone());
            out.push(b'}');
        } else {
            write_choice(out, c);
        }
    }
    out.extend_from_slice(b"]}");
}

fn write_choice(out: &mut Vec<u8>, c: &ChoiceOutput) {
    let ChoiceOutput {
        index,
        message,
        finish_reason,
        output_token_ids,
        rollout_logprobs,
    } = c;
    out.extend_from_slice(b"{\"index\":");
    int(out, *index);
    out.push(b',');
    write_reply(
        out,
        Some(message),
        finish_reason,
        output_token_ids,
        rollout_logprobs,
    );
    out.push(b'}');
}

/// The reply fields a record's output and each of its choices share, in serde's order.
fn write_reply(
    out: &mut Vec<u8>,
    message: Option<&ReplyMessage>,
    finish_reason: &Option<String>,
    output_token_ids: &[i64],
    rollout_logprobs: &Option<Vec<f64>>,
) {
    out.extend_from_slice(b"\"message\":");
    match message {
        Some(m) => write_message(out, m),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"finish_reason\":");
    opt_string(out, finish_reason.as_deref());
    out.extend_from_slice(b",\"output_token_ids\":");
    ints(out, output_token_ids);
    out.extend_from_slice(b",\"rollout_logprobs\":");
    value(out, rollout_logprobs);
}

fn write_message(out: &mut Vec<u8>, m: &ReplyMessage) {
    let ReplyMessage {
        content,
        reasoning,
        role,
        tool_calls,
    } = m;
    out.extend_from_slice(b"{\"content\":");
    opt_string(out, content.as_deref());
    if let Some(r) = reasoning {
        out.extend_from_slice(b",\"reasoning\":");
        string(out, r);
    }
    out.extend_from_slice(b",\"role\":");
    string(out, role);
    if !tool_calls.is_empty() {
        out.extend_from_slice(b",\"tool_calls\":[");
        for (i, t) in tool_calls.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"function\":{\"arguments\":");
            string(out, &t.arguments);
            out.extend_from_slice(b",\"name\":");
            string(out, &t.name);
            out.extend_from_slice(b"},\"id\":");
            opt_string(out, t.id.as_deref());
            out.extend_from_slice(b",\"type\":");
            string(out, t.kind_or_function());
            out.push(b'}');
        }
        out.push(b']');
    }
    out.push(b'}');
}

fn write_tokens(out: &mut Vec<u8>, t: &Tokens) {
    let Tokens {
        prompt,
        completion,
        total,
        cached,
    } = t;
    out.extend_from_slice(b"{\"prompt\":");
    int(out, *prompt);
    out.extend_from_slice(b",\"completion\":");
    int(out, *completion);
    out.extend_from_slice(b",\"total\":");
    int(out, *total);
    if let Some(cached) = cached {
        out.extend_from_slice(b",\"cached\":");
        int(out, *cached);
    }
    out.push(b'}');
}

/// A JSON value: its strings (the reply's text, mostly) are escaped here, numbers are
/// written by serde_json.
fn json(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => value(out, n),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json(out, item);
            }
            out.push(b']');
        }
        Value::Object(m) => map(out, m),
    }
}

/// A JSON object, in the map's own order (the order serde_json writes it in).
fn map(out: &mut Vec<u8>, m: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        json(out, v);
    }
    out.push(b'}');
}

/// Values whose text serde_json decides (numbers, floats, lists of them): written by it.
fn value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing plain data into a Vec cannot fail; a failure would leave a partial value,
    // which the record's readers reject, so it is not silently wrong either.
    let _ = serde_json::to_writer(&mut *out, v);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string, escaped as serde_json escapes: `\"`, `\\`, the short forms of backspace,
/// form feed, newline, return and tab, `\u00XX` (lower-case hex) for other control
/// characters; everything else as it is.
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut rest = s.as_bytes();
    while let Some(at) = find_stop(rest) {
        out.extend_from_slice(&rest[..at]);
        let c = rest[at];
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
            }
        }
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// A list of integers (token ids: a long prompt has thousands, where serde's machinery cost
/// about 60 instructions each).
fn ints(out: &mut Vec<u8>, v: &[i64]) {
    out.push(b'[');
    for (k, &n) in v.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        int(out, n);
    }
    out.push(b']');
}

/// An integer in decimal, as serde_json writes it (with `itoa`), without its machinery:
/// records have several, and `write!` costs a few hundred instructions each.
fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::record::ToolCall;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn same_as_serde(rec: &TraceRecord) {
        let mut ours = Vec::new();
        write_record(&mut ours, rec);
        let theirs = serde_json::to_vec(rec).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    /// A choice with no text, only an index and token ids.
    fn bare_choice(index: u64, output_token_ids: Vec<i64>) -> ChoiceOutput {
        ChoiceOutput {
            index,
            message: ReplyMessage {
                content: None,
                reasoning: None,
                role: "assistant".into(),
                tool_calls: vec![],
            },
            finish_reason: None,
            output_token_ids,
            rollout_logprobs: None,
        }
    }

    #[test]
    fn writes_integers_as_serde_json_does() {
        let mut edges = vec![0, 1, 9, u64::MAX];
        let mut p = 10u64;
        while let Some(next) = p.checked_mul(10) {
            edges.extend([p - 1, p, p + 1]);
            p = next;
        }
        edges.extend([p - 1, p, p + 1]);
        for &n in &edges {
            same_as_serde(&TraceRecord {
                status: u16::try_from(n).unwrap_or(u16::MAX),
                tokens: Tokens {
                    prompt: n,
                    completion: n / 7,
                    total: n.wrapping_add(3),
                    cached: Some(n),
                },
                output: TraceOutput {
                    choices: vec![bare_choice(n, vec![])],
                    ..TraceOutput::default()
                },
                ..TraceRecord::default()
            });
        }
        // Token ids: lists of signed integers, empty or not.
        let ids: Vec<i64> = edges
            .iter()
            .flat_map(|&n| [n as i64, (n as i64).wrapping_neg(), -((n / 3) as i64)])
            .chain([i64::MIN, i64::MAX, -1, 0])
            .collect();
        for ids in [vec![], vec![7], ids] {
            let mut rec = TraceRecord::default();
            rec.input.prompt_token_ids = TokenIds::Values(ids.clone());
            rec.output.output_token_ids = ids.iter().rev().copied().collect();
            rec.output.choices = vec![bare_choice(0, ids.clone())];
            same_as_serde(&rec);
            // Ids kept as the text serde_json writes for them: written as they are.
            let text = serde_json::to_string(&ids).unwrap();
            rec.input.prompt_token_ids = TokenIds::Text(text.into());
            same_as_serde(&rec);
            let back: TraceRecord =
                serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
            assert_eq!(back.input.prompt_token_ids.values(), ids);
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        same_as_serde(&TraceRecord::default());
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let text = format!("q\"b\\s/ é😀 \u{7f}\u{80}{every_control}end");
        let raw = |s: &str| Some(RawValue::from_string(s.to_string()).unwrap());
        let choice = |index: u64| ChoiceOutput {
            index,
            message: ReplyMessage {
                content: Some(text.clone()),
                reasoning: (index > 0).then(|| text.clone()),
                role: text.clone(),
                tool_calls: vec![
                    ToolCall {
                        id: Some("t".into()),
                        kind: None,
                        name: text.clone(),
                        arguments: text.clone(),
                    },
                    ToolCall {
                        id: None,
                        kind: Some(text.clone()),
                        name: String::new(),
                        arguments: "{}".into(),
                    },
                ],
            },
            finish_reason: Some(text.clone()),
            output_token_ids: vec![-1, 0, i64::MAX, i64::MIN],
            rollout_logprobs: Some(vec![-0.5, 0.0, -1e-300, f64::NAN, f64::INFINITY, -12.25]),
        };
        let mut meta = serde_json::Map::new();
        meta.insert("session_uids".into(), json!(["a", text]));
        meta.insert(text.clone(), json!({"n": 1.5, "z": null}));
        meta.insert(
            "values".into(),
            json!({"n": [1, -2, 3.5e300, true, false, null, [], {}], "deep": [[["x"]]],
                   "u": u64::MAX, "i": i64::MIN, "f": -0.0}),
        );
        same_as_serde(&TraceRecord {
            trace_id: text.clone(),
            request_id: "req_1".into(),
            name: "proxy/m".into(),
            timestamp: 1_795_549_264.965_206,
            latency_ms: 0.1 + 0.2,
            ttft_ms: Some(19.942_747_999_999_998),
            route: "chat_completions".into(),
            model: "m".into(),
            upstream_model: String::new(),
            upstream: "u".into(),
            replica: Some("127.0.0.1:1".into()),
            session_name: Some(text.clone()),
            session_uids: vec!["a".into(), text.clone(), String::new()],
            metadata: meta,
            input: TraceInput {
                messages: raw(r#"[{"role": "user", "content": "a\u00e9"}]"#),
                prompt: raw(r#""p""#),
                input: None,
                prompt_token_ids: TokenIds::Text("[1,2,3]".into()),
            },
            output: TraceOutput {
                message: Some(choice(0).message),
                finish_reason: None,
                output_token_ids: vec![],
                rollout_logprobs: None,
                choices: vec![choice(0), choice(7)],
            },
            tokens: Tokens {
                prompt: u64::MAX,
                completion: 0,
                total: 5,
                cached: Some(3),
            },
            stream: true,
            status: 502,
            error: Some(text.clone()),
        });
        same_as_serde(&TraceRecord {
            input: TraceInput {
                messages: None,
                prompt: None,
                input: raw("[1]"),
                prompt_token_ids: TokenIds::default(),
            },
            ttft_ms: Some(f64::NAN),
            ..TraceRecord::default()
        });
        // The top-level reply repeated as the first choice (as records are built): the
        // first choice's text is a copy, whatever its index.
        for first in [0, 3] {
            let mut c = choice(first);
            c.rollout_logprobs = Some(vec![-0.5, -1e-300]);
            let mut other = c.clone();
            other.index = 9;
            same_as_serde(&TraceRecord {
                output: TraceOutput {
                    message: Some(c.message.clone()),
                    finish_reason: c.finish_reason.clone(),
                    output_token_ids: c.output_token_ids.clone(),
                    rollout_logprobs: c.rollout_logprobs.clone(),
                    choices: vec![c, other],
                },
                ..TraceRecord::default()
            });
        }
    }
}
