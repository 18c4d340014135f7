//! CORS: preflights answered locally, allow headers added to responses for allowed origins.
//! Without a `cors:` section nothing here runs and no CORS header is ever sent.

use crate::config::edge::CorsSettings;
use crate::error::EdgeError;
use http::HeaderMap;

/// A header to add to a response.
pub type HeaderPair = (&'static str, String);

/// Whether the request is a CORS preflight.
pub fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn origin_allowed<'a>(cors: &CorsSettings, origin: &'a str) -> Option<&'a str> {
    if cors.allow_origins.iter().any(|o| o == origin) {
        Some(origin)
    } else if cors.allow_origins.iter().any(|o| o == "*") {
        Some("*")
    } else {
        None
    }
}

/// Headers of the 204 answer to an allowed preflight, or 403 for a refused one.
pub fn preflight(cors: &CorsSettings, headers: &HeaderMap) -> Result<Vec<HeaderPair>, EdgeError> {
    let origin = headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(allow) = origin_allowed(cors, origin) else {
        return Err(EdgeError::OriginNotAllowed);
    };
    let method = headers
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let method_ok = cors
        .allow_methods
        .split(", ")
        .any(|m| m.eq_ignore_ascii_case(method.trim()));
    let requested = headers
        .get(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let headers_ok = requested
        .split(',')
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .all(|h| cors.allow_headers.iter().any(|a| a.eq_ignore_ascii_case(h)));
    if !method_ok || !headers_ok {
        return Err(EdgeError::OriginNotAllowed);
    }
    let mut out = vec![
        ("access-control-allow-origin", allow.to_string()),
        ("access-control-allow-methods", cors.allow_methods.clone()),
        (
            "access-control-allow-headers",
            cors.allow_headers.join(", "),
        ),
        ("access-control-max-age", cors.max_age.as_secs().to_string()),
        ("vary", "Origin".to_string()),
    ];
    if cors.allow_credentials {
        out.push(("access-control-allow-credentials", "true".to_string()));
    }
    Ok(out)
}

/// Headers for an actual (non-preflight) response to an allowed origin; empty otherwise.
pub fn response_headers(cors: &CorsSettings, headers: &HeaderMap) -> Vec<HeaderPair> {
    let Some(origin) = headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return Vec::new();
    };
    let Some(allow) = origin_allowed(cors, origin) else {
        return Vec::new();
    };
    let mut out = vec![("access-control-allow-origin", allow.to_string())];
    if allow != "*" {
        out.push(("vary", "Origin".to_string()));
    }
    if cors.allow_credentials {
        out.push(("access-control-allow-credentials", "true".to_string()));
    }
    if !cors.expose_headers.is_empty() {
        out.push(("access-control-expose-headers", cors.expose_headers.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CorsSettings {
        let text = "auth: {mode: open}\ncors: {allow_origins: ['https://app.example.com'], allow_credentials: true}\n";
        crate::config::from_yaml_str(text, &|_| None)
            .unwrap()
            .cors
            .unwrap()
    }

    fn req(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn allowed_preflight() {
        let h = req(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "Authorization, Content-Type",
            ),
        ]);
        assert!(is_preflight(&http::Method::OPTIONS, &h));
        let out = preflight(&settings(), &h).unwrap();
        let get = |k: &str| out.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get("access-control-allow-credentials"), Some("true"));
        assert!(get("access-control-allow-headers")
            .unwrap()
            .contains("authorization"));
    }

    #[test]
    fn refused_preflights() {
        let s = settings();
        for h in [
            req(&[
                ("origin", "https://evil.example.com"),
                ("access-control-request-method", "POST"),
            ]),
            req(&[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "DELETE"),
            ]),
            req(&[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-secret-header"),
            ]),
        ] {
            assert_eq!(preflight(&s, &h), Err(EdgeError::OriginNotAllowed));
        }
    }

    #[test]
    fn response_headers_only_for_allowed_origins() {
        let s = settings();
        assert!(response_headers(&s, &req(&[])).is_empty());
        assert!(response_headers(&s, &req(&[("origin", "https://evil.example.com")])).is_empty());
        let out = response_headers(&s, &req(&[("origin", "https://app.example.com")]));
        assert!(out.contains(&("vary", "Origin".to_string())));
    }
}
