//! rLLM path metadata: `slug::extract` and `slug::decode_slug` on arbitrary UTF-8 paths.
//!
//! Invariants: never panics; a path without metadata comes back unchanged; stripped paths
//! are shorter than the input; any decoded object, and any JSON object the input itself is,
//! encodes to a slug that `extract` gives back (both the `rllm1:` and `rllm1%3A` forms),
//! floats to 1 ULP (see `llm_edge_fuzz::same_json`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_edge::route::slug::{decode_slug, encode_slug, extract, PathMeta, DEFAULT_MAX_SLUG};
use llm_edge_fuzz::same_map;
use serde_json::{Map, Value};

fn check_extracted(path: &str, m: &PathMeta) {
    match (&m.metadata, &m.session_id) {
        (None, None) => assert_eq!(m.path, path, "a path without metadata is unchanged"),
        (Some(meta), None) => {
            assert!(path.contains("/meta/"), "metadata without a /meta/ segment");
            if path.starts_with('/') {
                assert!(m.path.starts_with('/'), "stripped path {:?}", m.path);
            }
            assert!(m.path.len() < path.len(), "nothing was stripped");
            round_trip(meta);
        }
        (None, Some(_)) => {
            assert!(path.starts_with("/sessions/"));
            assert!(m.path.starts_with("/v1"), "routed path {:?}", m.path);
            assert!(path.ends_with(m.path.as_str()));
        }
        (Some(_), Some(_)) => panic!("both a slug and a session id"),
    }
}

fn round_trip(meta: &Map<String, Value>) {
    let slug = encode_slug(meta);
    let b64 = slug
        .strip_prefix("rllm1:")
        .expect("encode_slug writes the rllm1: prefix");
    let back = decode_slug(b64, usize::MAX).expect("encoded slug decodes");
    assert!(same_map(&back, meta), "{back:?} != {meta:?}");
    for form in [slug.clone(), format!("rllm1%3A{b64}")] {
        let path = format!("/t/meta/{form}/v1/chat/completions?x=1");
        let m = extract(&path, usize::MAX).expect("encoded slug extracts");
        assert_eq!(m.path, "/t/v1/chat/completions?x=1");
        assert!(same_map(m.metadata.as_ref().expect("metadata"), meta));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Limits on both sides of the input's own length.
    for max in [DEFAULT_MAX_SLUG, data.len() / 2] {
        let decoded = decode_slug(text, max);
        if text.len() > max {
            assert!(decoded.is_err(), "a slug over the limit decoded");
        }
        if let Ok(m) = extract(text, max) {
            check_extracted(text, &m);
        }
    }
    if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) {
        round_trip(&obj);
    }
});
