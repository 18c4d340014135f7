//! Top-level body edits: `shaping::body::TopLevel::parse` then `apply`, and the sampling
//! policy planner (`shaping::sampling::plan`) on the same body.
//!
//! Input: an edit spec, `\n`, then the body. The spec is read two bytes per edit (at most 8):
//! the first picks the key (even: an existing key by index; odd: one of `NEW_KEYS`), the
//! second the operation (`% 4 == 3`: remove; otherwise set to one of `VALUES`). Bit 0 of the
//! first spec byte also turns injection on for the planner. No `\n`: no edits, all the input is
//! the body.
//!
//! Invariants, when `parse` accepts the body: `apply_pieces` says what `apply` says; `apply`'s
//! output parses again, its keys are the
//! input's in order minus removals plus additions, untouched members keep their exact bytes;
//! when the body also parses as a `serde_json::Value` (nesting within serde_json's limit), the
//! output equals the input with the edits applied (last edit of a key wins; removing a key the
//! body lacks does nothing) and the planned body equals the policy applied to the input (floats
//! in the objects the planner re-serialises to 1 ULP, see `llm_edge_fuzz::same_json`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_edge::shaping::body::{Edit, TopLevel};
use llm_edge::shaping::sampling::{plan, Action, FieldPath, Policy};
use llm_edge_fuzz::same_json;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::sync::OnceLock;

const NEW_KEYS: [&str; 6] = ["model", "x", "", "q\"\\\u{1}/", "é", "stream_options"];
const VALUES: [&str; 8] = [
    "1",
    "null",
    "\"s\"",
    "{\"a\":[1,{}]}",
    "[]",
    " true ",
    "-0.5e3",
    "\"\\u00e9\\n\"",
];

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let rule = |f: &str, a: Action| (FieldPath::parse(f).expect("valid field"), a);
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
    })
}

/// `policy()` applied to a parsed body, the slow way.
fn planned_value(input: &Map<String, Value>, inject: bool) -> Map<String, Value> {
    let mut m = input.clone();
    m.remove("temperature");
    if let Some(Value::Object(meta)) = m.get_mut("metadata") {
        meta.remove("a");
    }
    if inject {
        m.entry("logprobs").or_insert(json!(true));
        m.insert("top_logprobs".into(), json!(5));
        if input.get("stream") == Some(&Value::Bool(true)) {
            match m
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()))
            {
                Value::Object(so) => {
                    so.insert("include_usage".into(), json!(true));
                    so.entry("continuous_usage_stats").or_insert(json!(true));
                }
                // Not an object: the client's value is left alone.
                _ => {}
            }
        }
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let (spec, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let Ok(top) = TopLevel::parse(body) else {
        return;
    };
    let keys: Vec<String> = top.keys().map(str::to_string).collect();
    let edits: Vec<Edit<'_>> = spec
        .chunks_exact(2)
        .take(8)
        .map(|c| {
            let pick = usize::from(c[0] >> 1);
            let key = if c[0] & 1 == 0 && !keys.is_empty() {
                keys[pick % keys.len()].as_str()
            } else {
                NEW_KEYS[pick % NEW_KEYS.len()]
            };
            if c[1] % 4 == 3 {
                Edit::Remove(key)
            } else {
                Edit::Set(
                    key,
                    Cow::Borrowed(VALUES[usize::from(c[1] >> 2) % VALUES.len()]),
                )
            }
        })
        .collect();
    let last_edit = |k: &str| edits.iter().rev().find(|e| edit_key(e) == k);

    let out = top.apply(&edits);
    let pieces = top.apply_pieces(&bytes::Bytes::copy_from_slice(body), &edits);
    assert_eq!(pieces.to_bytes(), out, "the pieces say what the copy says");
    let out_top = TopLevel::parse(&out).unwrap_or_else(|e| {
        panic!(
            "apply produced an invalid body: {e:?}\n{}",
            String::from_utf8_lossy(&out)
        )
    });
    let mut expected_keys: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .filter(|k| !matches!(last_edit(k), Some(Edit::Remove(_))))
        .collect();
    for e in &edits {
        if let Edit::Set(k, _) = e {
            if !keys.iter().any(|have| have == k) {
                expected_keys.push(k);
            }
        }
    }
    assert_eq!(out_top.keys().collect::<Vec<_>>(), expected_keys);
    for k in &keys {
        if last_edit(k).is_none() {
            assert_eq!(
                out_top.get(k).map(|v| v.get()),
                top.get(k).map(|v| v.get()),
                "untouched {k:?} changed"
            );
        }
    }

    if let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(body) {
        let mut expected = input.clone();
        for k in &keys {
            match last_edit(k) {
                Some(Edit::Set(_, v)) => {
                    expected.insert(k.clone(), serde_json::from_str(v).expect("VALUES are JSON"));
                }
                Some(Edit::Remove(_)) => {
                    expected.remove(k);
                }
                None => {}
            }
        }
        for e in &edits {
            if let Edit::Set(k, v) = e {
                if !input.contains_key(*k) {
                    expected.insert(
                        k.to_string(),
                        serde_json::from_str(v).expect("VALUES are JSON"),
                    );
                }
            }
        }
        let got: Value = serde_json::from_slice(&out).expect("output of apply is JSON");
        assert_eq!(got, Value::Object(expected));

        let inject = spec.first().is_some_and(|b| b & 1 == 1);
        let planned = plan(&top, policy(), inject);
        let shaped = top.apply(&planned.edits);
        let got: Value = serde_json::from_slice(&shaped).expect("planned body is JSON");
        let want = Value::Object(planned_value(&input, inject));
        assert!(
            same_json(&got, &want),
            "edits {:?}\n got {got:?}\nwant {want:?}",
            planned.edits
        );
    }
});

fn edit_key<'a>(e: &'a Edit<'_>) -> &'a str {
    match e {
        Edit::Set(k, _) | Edit::Remove(k) => k,
    }
}
