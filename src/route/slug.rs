//! rLLM path metadata: `/…/meta/rllm1:<slug>/v1/…` and `/sessions/<id>/v1/…`.
//!
//! The slug is base64url (padding optional) of a JSON object; rLLM's encoder writes compact,
//! key-sorted JSON without padding. Both path segments are stripped before routing.

use crate::error::EdgeError;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{Map, Value};

/// Default `limits.max_slug`: 64 KiB.
pub const DEFAULT_MAX_SLUG: usize = 64 << 10;

/// What the path carried, with the path to route on.
#[derive(Debug, Clone, PartialEq)]
pub struct PathMeta {
    /// The path with the metadata segments removed (query string not included).
    pub path: String,
    /// Decoded slug metadata, when the path had a `meta/rllm1:` slug.
    pub metadata: Option<Map<String, Value>>,
    /// Session id from `/sessions/<id>/v1/…`.
    pub session_id: Option<String>,
}

impl PathMeta {
    /// The session name for traces: the slug's `session_name`, else the `/sessions/` id.
    pub fn session_name(&self) -> Option<&str> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get("session_name"))
            .and_then(|v| v.as_str())
            .or(self.session_id.as_deref())
    }

    /// Whether the path carried any metadata.
    pub fn has_metadata(&self) -> bool {
        self.metadata.is_some() || self.session_id.is_some()
    }
}

/// Decodes one slug (the part after `rllm1:`).
pub fn decode_slug(slug: &str, max_len: usize) -> Result<Map<String, Value>, EdgeError> {
    if slug.len() > max_len {
        return Err(EdgeError::BadRequest(format!(
            "rLLM metadata slug is {} bytes, over the limit of {max_len}",
            slug.len()
        )));
    }
    let trimmed = slug.trim_end_matches('=');
    let bytes = URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| URL_SAFE.decode(slug))
        .map_err(|e| EdgeError::BadRequest(format!("rLLM metadata slug is not base64url: {e}")))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| EdgeError::BadRequest("rLLM metadata slug is not UTF-8".into()))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(EdgeError::BadRequest(
            "rLLM metadata slug is not a JSON object".into(),
        )),
        Err(e) => Err(EdgeError::BadRequest(format!(
            "rLLM metadata slug is not valid JSON: {e}"
        ))),
    }
}

/// Encodes metadata the way rLLM does (compact, sorted keys, no padding). For tests and tools.
pub fn encode_slug(meta: &Map<String, Value>) -> String {
    // serde_json's Map is a BTreeMap (no preserve_order feature): keys serialise sorted.
    let json = serde_json::to_vec(meta).unwrap_or_default();
    format!("rllm1:{}", URL_SAFE_NO_PAD.encode(json))
}

fn slug_of(segment: &str) -> Option<&str> {
    let prefix_len = if segment.starts_with("rllm1:") {
        6
    } else if segment
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("rllm1%3a"))
    {
        8
    } else {
        return None;
    };
    Some(&segment[prefix_len..])
}

/// Finds and strips path metadata. Hot: one scan over the path; paths without metadata
/// allocate nothing but the returned copy.
pub fn extract(path: &str, max_slug: usize) -> Result<PathMeta, EdgeError> {
    if let Some(rest) = path.strip_prefix("/sessions/") {
        // The id may contain '/', so the id runs up to the last "/v1/" (or a final "/v1").
        let cut = rest
            .rfind("/v1/")
            .or_else(|| rest.strip_suffix("/v1").map(|r| r.len()));
        if let Some(cut) = cut {
            let id = &rest[..cut];
            if id.is_empty() {
                return Err(EdgeError::BadRequest(
                    "empty session id in /sessions/ path".into(),
                ));
            }
            if id.len() > max_slug {
                return Err(EdgeError::BadRequest(format!(
                    "session id is over the limit of {max_slug} bytes"
                )));
            }
            let id = percent_encoding::percent_decode_str(id)
                .decode_utf8()
                .map_err(|_| EdgeError::BadRequest("session id is not UTF-8".into()))?
                .into_owned();
            return Ok(PathMeta {
                path: rest[cut..].to_string(),
                metadata: None,
                session_id: Some(id),
            });
        }
    }
    // Look for a "meta" segment followed by an "rllm1:" segment.
    let mut search = 0;
    while let Some(meta_at) = find_meta(path, search) {
        let seg_start = meta_at + "/meta/".len();
        let seg_end = path[seg_start..]
            .find('/')
            .map(|i| seg_start + i)
            .unwrap_or(path.len());
        if let Some(slug) = slug_of(&path[seg_start..seg_end]) {
            let metadata = decode_slug(slug, max_slug)?;
            let mut stripped = String::with_capacity(path.len());
            stripped.push_str(&path[..meta_at]);
            stripped.push_str(&path[seg_end..]);
            if stripped.is_empty() {
                stripped.push('/');
            }
            return Ok(PathMeta {
                path: stripped,
                metadata: Some(metadata),
                session_id: None,
            });
        }
        search = meta_at + 1;
    }
    Ok(PathMeta {
        path: path.to_string(),
        metadata: None,
        session_id: None,
    })
}

/// Where the next `/meta/` starts at or after `from`. Paths are short and seldom hold one, so
/// the few slashes are checked in turn (a substring search would first build its searcher).
fn find_meta(path: &str, from: usize) -> Option<usize> {
    let bytes = path.as_bytes();
    memchr::memchr_iter(b'/', &bytes[from..])
        .map(|i| from + i)
        .find(|&i| bytes[i..].starts_with(b"/meta/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn design_vectors() {
        assert_eq!(
            decode_slug("eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9", DEFAULT_MAX_SLUG).unwrap(),
            obj(json!({"session_name": "sess_123"}))
        );
        assert_eq!(decode_slug("e30", DEFAULT_MAX_SLUG).unwrap(), Map::new());
        assert!(decode_slug("a", DEFAULT_MAX_SLUG).is_err());
    }

    #[test]
    fn padding_and_whitespace_are_tolerated() {
        // base64url of `{ "a" : 1 }` with padding.
        let padded = URL_SAFE.encode(b"{ \"a\" : 1 }");
        assert!(padded.ends_with('='));
        assert_eq!(
            decode_slug(&padded, DEFAULT_MAX_SLUG).unwrap(),
            obj(json!({"a": 1}))
        );
    }

    #[test]
    fn malformed_slugs_are_bad_requests() {
        let not_object = URL_SAFE_NO_PAD.encode(b"[1]");
        let not_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe]);
        let not_json = URL_SAFE_NO_PAD.encode(b"{nope");
        for bad in [
            "a",
            "!!!",
            not_object.as_str(),
            not_utf8.as_str(),
            not_json.as_str(),
        ] {
            let e = decode_slug(bad, DEFAULT_MAX_SLUG).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
        let long = "e".repeat(100);
        assert!(decode_slug(&long, 10)
            .unwrap_err()
            .message()
            .contains("limit"));
    }

    #[test]
    fn strips_meta_segments_anywhere() {
        let m = extract("/meta/rllm1:e30/v1/chat/completions", 1000).unwrap();
        assert_eq!(m.path, "/v1/chat/completions");
        assert_eq!(m.metadata, Some(Map::new()));
        let m = extract(
            "/tenant/x/meta/rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9/v1/completions",
            1000,
        )
        .unwrap();
        assert_eq!(m.path, "/tenant/x/v1/completions");
        assert_eq!(m.session_name(), Some("sess_123"));
        let m = extract("/meta/rllm1%3Ae30/v1/models", 1000).unwrap();
        assert_eq!(m.path, "/v1/models");
    }

    #[test]
    fn meta_is_a_marker_only_before_rllm1() {
        let m = extract("/meta/other/v1/chat/completions", 1000).unwrap();
        assert_eq!(m.path, "/meta/other/v1/chat/completions");
        assert!(!m.has_metadata());
        let m = extract("/v1/chat/completions", 1000).unwrap();
        assert_eq!(m.path, "/v1/chat/completions");
    }

    #[test]
    fn meta_search_finds_what_a_substring_search_finds() {
        let paths = [
            "",
            "/",
            "/meta",
            "/meta/",
            "meta/x",
            "/x/meta/",
            "/meta/meta/rllm1:e30/v1",
            "//meta//meta/",
            "/metameta/meta/x",
            "/v1/chat/completions",
            "/a/b/c/meta/rllm1:e30",
        ];
        for p in paths {
            for from in 0..=p.len() {
                assert_eq!(
                    find_meta(p, from),
                    p[from..].find("/meta/").map(|i| from + i),
                    "{p:?} {from}"
                );
            }
        }
        let m = extract("/meta/meta/rllm1:e30/v1/models", 1000).unwrap();
        assert_eq!(m.path, "/meta/v1/models");
        assert_eq!(m.metadata, Some(Map::new()));
    }

    #[test]
    fn sessions_form_matches_up_to_the_last_v1() {
        let m = extract("/sessions/run-7/ep/3/v1/chat/completions", 1000).unwrap();
        assert_eq!(m.session_id.as_deref(), Some("run-7/ep/3"));
        assert_eq!(m.path, "/v1/chat/completions");
        let m = extract("/sessions/a/v1/b/v1/completions", 1000).unwrap();
        assert_eq!(m.session_id.as_deref(), Some("a/v1/b"));
        assert_eq!(m.path, "/v1/completions");
        assert!(extract("/sessions//v1/x", 1000).is_err());
    }

    #[test]
    fn encoder_matches_rllm_form() {
        let meta = obj(json!({"session_name": "sess_123"}));
        assert_eq!(
            encode_slug(&meta),
            "rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9"
        );
        let nested = obj(json!({"b": {"y": 1.5, "x": "é"}, "a": [1, 2]}));
        let slug = encode_slug(&nested);
        let back = decode_slug(slug.strip_prefix("rllm1:").unwrap(), 1000).unwrap();
        assert_eq!(back, nested);
    }
}
