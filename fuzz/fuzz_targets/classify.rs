//! Path classification (`route::api::classify`) and pass-through path rewriting
//! (`route::table::rewrite_path`) on arbitrary UTF-8 paths.
//!
//! Input: byte 0 picks `strip_prefix` (bit 0) and the prefix length (the other bits); the
//! rest is the path, whose first bytes (cut at a char boundary) become the route prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_edge::config::RouteConfig;
use llm_edge::route::api::{classify, ApiEndpoint, ApiPath};
use llm_edge::route::table::rewrite_path;

const KNOWN: [(&str, ApiPath); 7] = [
    (
        "/v1/chat/completions",
        ApiPath::Call(ApiEndpoint::ChatCompletions),
    ),
    ("/v1/completions", ApiPath::Call(ApiEndpoint::Completions)),
    ("/v1/embeddings", ApiPath::Call(ApiEndpoint::Embeddings)),
    ("/v1/responses", ApiPath::Call(ApiEndpoint::Responses)),
    ("/v1/messages", ApiPath::Call(ApiEndpoint::Messages)),
    (
        "/v1/messages/count_tokens",
        ApiPath::Call(ApiEndpoint::CountTokens),
    ),
    ("/v1/models", ApiPath::ListModels),
];

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };

    let expected = KNOWN
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(ApiPath::Other, |(_, c)| *c);
    assert_eq!(classify(path), expected, "{path:?}");
    if let ApiPath::Call(e) = expected {
        assert!(!e.label().is_empty());
    }

    let mut cut = usize::from(ctl >> 1).min(path.len());
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    let route = RouteConfig {
        prefix: path[..cut].to_string(),
        upstream: "u".to_string(),
        strip_prefix: ctl & 1 == 1,
    };
    let out = rewrite_path(&route, path);
    if !route.strip_prefix {
        assert_eq!(out, path);
        return;
    }
    assert!(out.starts_with('/'), "{out:?}");
    let rest = &path[cut..];
    assert!(
        out == rest || out.strip_prefix('/') == Some(rest),
        "{path:?} - {:?} -> {out:?}",
        route.prefix
    );
});
