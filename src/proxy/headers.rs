//! Header rules between client, llm-edge and upstream: hop-by-hop removal, client credentials
//! never forwarded, upstream credentials added the way the upstream kind expects.

use crate::config::Endpoint;
use crate::security::client_addr::FORWARDING_HEADERS;
use crate::upstream::keys::PooledKey;
use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus legacy ones; never forwarded in either direction.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Client headers that are ours to set toward the upstream.
const NOT_FORWARDED_ON_API_CALLS: [&str; 7] = [
    // Ours: the per-request injection switch.
    "x-llm-edge-inject",
    "host",
    "content-length",
    "transfer-encoding",
    "expect",
    // The body is observed (usage, traces), so ask for it uncompressed.
    "accept-encoding",
    "http2-settings",
];

/// Client credentials: never forwarded upstream.
pub const CLIENT_CREDENTIALS: [&str; 2] = ["authorization", "x-api-key"];

fn connection_nominated(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Whether a client header is dropped from an API call (hop-by-hop, ours to set, credentials,
/// forwarding headers, or nominated by `Connection`).
fn dropped_on_api_call(name: &HeaderName, nominated: &[HeaderName]) -> bool {
    let n = name.as_str();
    is_hop_by_hop(name)
        || NOT_FORWARDED_ON_API_CALLS.contains(&n)
        || CLIENT_CREDENTIALS.contains(&n)
        || FORWARDING_HEADERS.contains(&n)
        || nominated.contains(name)
}

/// Builds the request sent upstream for an API call: the client's end-to-end headers minus
/// credentials, plus `Host`, an exact `Content-Length` and the upstream key. (HTTP/2
/// upstreams; HTTP/1 ones get [`api_request_h1_head`], the same request in wire form.)
pub fn upstream_api_request(
    client: &RequestHeader,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    body_len: usize,
    ours: &[(&'static str, http::HeaderValue)],
) -> pingora::Result<RequestHeader> {
    let path = format!("{}{}", endpoint.base_path, path_and_query);
    let mut req = RequestHeader::build(
        client.method.clone(),
        path.as_bytes(),
        Some(client.headers.len() + ours.len() + 3),
    )?;
    let nominated = connection_nominated(&client.headers);
    for (name, value) in client.headers.iter() {
        if dropped_on_api_call(name, &nominated) {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    for (k, v) in ours {
        req.insert_header(*k, v.clone())?;
    }
    req.insert_header(header::HOST, endpoint.authority.as_str())?;
    req.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
    if let Some(k) = key {
        req.insert_header(k.header.clone(), k.value.clone())?;
    }
    Ok(req)
}

/// The request head of an API call to an HTTP/1 upstream, written as wire bytes into `buf`:
/// the same request as [`upstream_api_request`], without building a header map first (that
/// was the largest cost of the call path), so head and body leave in one write.
pub fn api_request_h1_head(
    buf: &mut bytes::BytesMut,
    client: &RequestHeader,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    body_len: usize,
    ours: &[(&'static str, http::HeaderValue)],
) -> pingora::Result<()> {
    let bad = |b: &u8| matches!(b, b' ' | b'\r' | b'\n' | 0);
    if endpoint.base_path.bytes().any(|b| bad(&b)) || path_and_query.bytes().any(|b| bad(&b)) {
        return pingora::Error::e_explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "request target contains a delimiter byte",
        );
    }
    let line = |buf: &mut bytes::BytesMut, name: &[u8], value: &[u8]| {
        buf.extend_from_slice(name);
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value);
        buf.extend_from_slice(b"\r\n");
    };
    buf.extend_from_slice(client.method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(endpoint.base_path.as_bytes());
    buf.extend_from_slice(path_and_query.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    line(buf, b"Host", endpoint.authority.as_bytes());
    let nominated = connection_nominated(&client.headers);
    let key_header = key.map(|k| &k.header);
    for (name, value) in client.headers.iter() {
        // Ours and the key header replace a client's header of the same name.
        if dropped_on_api_call(name, &nominated)
            || ours
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name.as_str()))
            || key_header == Some(name)
        {
            continue;
        }
        line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    for (k, v) in ours {
        line(buf, k.as_bytes(), v.as_bytes());
    }
    let mut digits = [0u8; 20];
    line(buf, b"Content-Length", decimal(body_len, &mut digits));
    if let Some(k) = key {
        line(buf, k.header.as_str().as_bytes(), k.value.as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
    Ok(())
}

/// `n` in decimal, written at the end of `out` (no formatting machinery on the hot path).
fn decimal(mut n: usize, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[i..];
        }
    }
}

/// Client headers removed from a pass-through request (credentials, forwarding headers).
fn stripped_on_passthrough(name: &str) -> bool {
    CLIENT_CREDENTIALS.contains(&name) || FORWARDING_HEADERS.contains(&name)
}

/// Rewrites a pass-through request in place: new path, `Host`, client credentials removed,
/// upstream key added. Pingora itself strips hop-by-hop headers on this path.
pub fn rewrite_passthrough_request(
    req: &mut RequestHeader,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    ours: &[(&'static str, http::HeaderValue)],
) -> pingora::Result<()> {
    let unchanged = endpoint.base_path.is_empty()
        && req.uri.path_and_query().map(|p| p.as_str()) == Some(path_and_query);
    if !unchanged {
        let path = format!("{}{}", endpoint.base_path, path_and_query);
        let uri: http::Uri = path.parse().map_err(|e| {
            pingora::Error::because(
                pingora::ErrorType::InvalidHTTPHeader,
                "rewriting the pass-through path",
                e,
            )
        })?;
        req.set_uri(uri);
    }
    // Each removal hashes the name twice; most requests carry few of these, so look first.
    let strip: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|n| stripped_on_passthrough(n.as_str()))
        .cloned()
        .collect();
    for name in &strip {
        req.remove_header(name);
    }
    for (k, v) in ours {
        req.insert_header(*k, v.clone())?;
    }
    req.insert_header(header::HOST, endpoint.authority.as_str())?;
    if let Some(k) = key {
        req.insert_header(k.header.clone(), k.value.clone())?;
    }
    Ok(())
}

/// The response header sent downstream for an upstream response: same status and end-to-end
/// headers; `Content-Length` kept so the framing stays the upstream's.
pub fn downstream_response(
    upstream: &ResponseHeader,
    ours: &[(&'static str, String)],
) -> pingora::Result<ResponseHeader> {
    let mut resp =
        ResponseHeader::build(upstream.status, Some(upstream.headers.len() + ours.len()))?;
    let nominated = connection_nominated(&upstream.headers);
    let chunked = upstream.headers.get(header::TRANSFER_ENCODING).is_some();
    for (name, value) in upstream.headers.iter() {
        if is_hop_by_hop(name) || name == header::TRANSFER_ENCODING || nominated.contains(name) {
            continue;
        }
        // A message with both framings is read as chunked (RFC 9112 §6.3); drop the length.
        if chunked && name == header::CONTENT_LENGTH {
            continue;
        }
        resp.append_header(name.clone(), value.clone())?;
    }
    add_ours(&mut resp, ours)?;
    // Without a length the body is delimited by chunked encoding (Pingora would otherwise end
    // it by closing the connection, making a broken stream look complete).
    if resp.headers.get(header::CONTENT_LENGTH).is_none() {
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(resp)
}

/// Adds llm-edge's own response headers (request id, CORS, rate limits) to a response.
pub fn add_ours(resp: &mut ResponseHeader, ours: &[(&'static str, String)]) -> pingora::Result<()> {
    for (k, v) in ours {
        if *k == "x-request-id" {
            // The client gets its own id back; the provider's id (which its support asks
            // for) stays available under another name.
            if let Some(theirs) = resp.remove_header("x-request-id") {
                resp.insert_header("x-upstream-request-id", theirs)?;
            }
        }
        if *k == "vary" {
            // Keep the upstream's Vary (e.g. Accept-Encoding) and add ours to it.
            let merged = match resp.headers.get("vary").and_then(|x| x.to_str().ok()) {
                Some(theirs) if !theirs.split(',').any(|t| t.trim().eq_ignore_ascii_case(v)) => {
                    format!("{theirs}, {v}")
                }
                Some(theirs) => theirs.to_string(),
                None => v.clone(),
            };
            resp.insert_header("vary", merged)?;
            continue;
        }
        resp.insert_header(*k, v.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_endpoint;

    #[test]
    fn api_request_drops_client_credentials_and_hop_by_hop() {
        let mut client = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer client-secret"),
            ("x-api-key", "client-secret"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("content-length", "999"),
            ("anthropic-version", "2023-06-01"),
            ("x-custom", "kept"),
            ("host", "proxy.local"),
        ] {
            client.append_header(k, v).unwrap();
        }
        let ep = parse_endpoint("http://10.0.0.1:8000/base").unwrap();
        let req =
            upstream_api_request(&client, "/v1/chat/completions?x=1", &ep, None, 42, &[]).unwrap();
        assert_eq!(req.uri.to_string(), "/base/v1/chat/completions?x=1");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("x-api-key").is_none());
        assert!(req.headers.get("connection").is_none());
        assert!(req.headers.get("x-drop-me").is_none());
        assert_eq!(req.headers["content-length"], "42");
        assert_eq!(req.headers["host"], "10.0.0.1:8000");
        assert_eq!(req.headers["anthropic-version"], "2023-06-01");
        assert_eq!(req.headers["x-custom"], "kept");
    }

    #[test]
    fn response_keeps_length_and_drops_hop_by_hop() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.append_header("content-length", "10").unwrap();
        up.append_header("connection", "close").unwrap();
        up.append_header("x-request-id", "abc").unwrap();
        let d = downstream_response(&up, &[]).unwrap();
        assert_eq!(d.headers["content-length"], "10");
        assert!(d.headers.get("connection").is_none());
        assert_eq!(d.headers["x-request-id"], "abc");
    }
}
