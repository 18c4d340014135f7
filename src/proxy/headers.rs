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

/// Client headers that are ours to set on a pass-through request the forwarder sends.
const NOT_FORWARDED_ON_PASS_THROUGH: [&str; 4] = [
    "host",
    "content-length",
    "transfer-encoding",
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

/// Whether a client header is dropped from a pass-through request the forwarder sends: as on
/// Pingora's proxy path, everything end to end goes except credentials and forwarding headers
/// (`Accept-Encoding` included: nothing observes the body).
fn dropped_on_pass_through(name: &HeaderName, nominated: &[HeaderName]) -> bool {
    let n = name.as_str();
    is_hop_by_hop(name)
        || NOT_FORWARDED_ON_PASS_THROUGH.contains(&n)
        || stripped_on_passthrough(n)
        || nominated.contains(name)
}

/// The client's request as the forwarder sends it: the method and the end-to-end headers
/// that go upstream, in order. Taken once per call, since every attempt sends the same ones;
/// credentials, hop-by-hop headers, ours to set and the names in `ours` are left out.
pub struct ClientHead {
    /// The client's method.
    pub method: http::Method,
    /// The client headers forwarded upstream.
    pub headers: Vec<(HeaderName, http::HeaderValue)>,
    /// Whether the request declares its body length: always for API calls; for pass-through
    /// requests when the client did (a bodiless GET gets no `Content-Length: 0`).
    pub declares_length: bool,
}

impl ClientHead {
    /// The forwarded part of an API call; `ours` are the headers llm-edge sets itself.
    pub fn of(client: &RequestHeader, ours: &[(HeaderName, http::HeaderValue)]) -> Self {
        Self::keeping(client, ours, dropped_on_api_call, true)
    }

    /// The forwarded part of a pass-through request; `ours` as for [`ClientHead::of`].
    pub fn of_pass_through(
        client: &RequestHeader,
        ours: &[(HeaderName, http::HeaderValue)],
    ) -> Self {
        let declares_length = client.headers.contains_key(header::CONTENT_LENGTH);
        Self::keeping(client, ours, dropped_on_pass_through, declares_length)
    }

    fn keeping(
        client: &RequestHeader,
        ours: &[(HeaderName, http::HeaderValue)],
        dropped: fn(&HeaderName, &[HeaderName]) -> bool,
        declares_length: bool,
    ) -> Self {
        let nominated = connection_nominated(&client.headers);
        let headers = client
            .headers
            .iter()
            .filter(|(name, _)| !dropped(name, &nominated) && !ours.iter().any(|(k, _)| k == *name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Self {
            method: client.method.clone(),
            headers,
            declares_length,
        }
    }
}

/// Builds the request sent upstream for an API call: the client's forwarded headers, plus
/// ours, `Host`, an exact `Content-Length` and the upstream key. (HTTP/2 upstreams; HTTP/1
/// ones get [`api_request_h1_head`], the same request in wire form.)
pub fn upstream_api_request(
    client: &ClientHead,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    body_len: usize,
    ours: &[(HeaderName, http::HeaderValue)],
) -> pingora::Result<RequestHeader> {
    let path = format!("{}{}", endpoint.base_path, path_and_query);
    let mut req = RequestHeader::build(
        client.method.clone(),
        path.as_bytes(),
        Some(client.headers.len() + ours.len() + 3),
    )?;
    for (name, value) in &client.headers {
        req.append_header(name.clone(), value.clone())?;
    }
    for (k, v) in ours {
        req.insert_header(k.clone(), v.clone())?;
    }
    req.insert_header(header::HOST, endpoint.authority.as_str())?;
    if client.declares_length || body_len > 0 {
        req.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
    }
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
    client: &ClientHead,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    body_len: usize,
    ours: &[(HeaderName, http::HeaderValue)],
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
    let key_header = key.map(|k| &k.header);
    for (name, value) in &client.headers {
        // Key headers are credentials, which `ClientHead` leaves out; this keeps it so.
        if key_header == Some(name) {
            continue;
        }
        line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    for (k, v) in ours {
        line(buf, k.as_str().as_bytes(), v.as_bytes());
    }
    if client.declares_length || body_len > 0 {
        let mut digits = [0u8; 20];
        line(buf, b"Content-Length", decimal(body_len, &mut digits));
    }
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

/// Takes the request's parts out, leaving an empty header behind. The parts have a single
/// header map: Pingora's `RequestHeader` keeps a second one for the names' original case,
/// and every insert into both (with their growth) was the largest cost of this path. Names
/// then go out in their canonical form (title case for the common ones, lowercase for the
/// rest), which HTTP/1.1 treats as equal and HTTP/2 requires.
fn take_parts(req: &mut RequestHeader) -> http::request::Parts {
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    std::mem::replace(req, empty).into()
}

/// Rewrites a pass-through request in place: new path, `Host`, client credentials removed,
/// upstream key added. Pingora itself strips hop-by-hop headers on this path.
pub fn rewrite_passthrough_request(
    req: &mut RequestHeader,
    path_and_query: &str,
    endpoint: &Endpoint,
    key: Option<&PooledKey>,
    ours: &[(HeaderName, http::HeaderValue)],
) -> pingora::Result<()> {
    let unchanged = endpoint.base_path.is_empty()
        && req.uri.path_and_query().map(|p| p.as_str()) == Some(path_and_query);
    let uri = if unchanged {
        None
    } else {
        // Joined and handed over without `format!` or a second copy (every pass-through call).
        let path = [endpoint.base_path.as_str(), path_and_query].concat();
        Some(http::Uri::try_from(path).map_err(|e| {
            pingora::Error::because(
                pingora::ErrorType::InvalidHTTPHeader,
                "rewriting the pass-through path",
                e,
            )
        })?)
    };
    let host = http::HeaderValue::from_str(&endpoint.authority).map_err(|e| {
        pingora::Error::because(
            pingora::ErrorType::InvalidHTTPHeader,
            "the endpoint's authority as Host",
            e,
        )
    })?;
    let end_stream = req.send_end_stream();
    let mut parts = take_parts(req);
    if let Some(uri) = uri {
        parts.uri = uri;
    }
    let h = &mut parts.headers;
    // Most requests carry few of these: look before removing.
    let strip: Vec<HeaderName> = h
        .keys()
        .filter(|n| stripped_on_passthrough(n.as_str()))
        .cloned()
        .collect();
    for name in &strip {
        h.remove(name);
    }
    h.reserve(ours.len() + 2);
    for (k, v) in ours {
        h.insert(k.clone(), v.clone());
    }
    h.insert(header::HOST, host);
    if let Some(k) = key {
        h.insert(k.header.clone(), k.value.clone());
    }
    *req = RequestHeader::from(parts);
    if let Some(end) = end_stream {
        req.set_send_end_stream(end);
    }
    Ok(())
}

/// The response header sent downstream for an upstream response: same status and end-to-end
/// headers; `Content-Length` kept so the framing stays the upstream's.
pub fn downstream_response(
    upstream: ResponseHeader,
    ours: &[(&'static str, String)],
) -> pingora::Result<ResponseHeader> {
    // The upstream's header map is edited in place: copying every field into a new map cost
    // about 1,500 instructions per call (callgrind S1). Only `http` parts, one map: a
    // `ResponseHeader` built by `append_header` keeps a second one for header-name case.
    let upstream: http::response::Parts = upstream.into();
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = upstream.status;
    parts.headers = upstream.headers;
    let h = &mut parts.headers;
    let nominated = connection_nominated(h);
    let chunked = h.contains_key(header::TRANSFER_ENCODING);
    // Found in one pass, as most responses have none of them (or only `connection`).
    let dropped: Vec<HeaderName> = h
        .keys()
        .filter(|&name| {
            is_hop_by_hop(name)
                || name == header::TRANSFER_ENCODING
                || nominated.contains(name)
                // A message with both framings is read as chunked (RFC 9112 §6.3).
                || (chunked && name == header::CONTENT_LENGTH)
        })
        .cloned()
        .collect();
    for name in &dropped {
        h.remove(name);
    }
    add_ours_to(h, ours)?;
    // Without a length the body is delimited by chunked encoding (Pingora would otherwise end
    // it by closing the connection, making a broken stream look complete). Responses that
    // never have a body (1xx, 204, 304) must not say `Transfer-Encoding` (RFC 9112 §6.1).
    let bodiless = parts.status.is_informational() || matches!(parts.status.as_u16(), 204 | 304);
    let h = &mut parts.headers;
    if !bodiless && !h.contains_key(header::CONTENT_LENGTH) {
        h.insert(
            header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
    }
    Ok(ResponseHeader::from(parts))
}

/// Adds llm-edge's own response headers (request id, CORS, rate limits) to a response. The
/// edits go to the header's parts (one map, see `take_parts`).
pub fn add_ours(resp: &mut ResponseHeader, ours: &[(&'static str, String)]) -> pingora::Result<()> {
    if ours.is_empty() {
        return Ok(());
    }
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, empty).into();
    let result = add_ours_to(&mut parts.headers, ours);
    *resp = ResponseHeader::from(parts);
    result
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

fn add_ours_to(h: &mut http::HeaderMap, ours: &[(&'static str, String)]) -> pingora::Result<()> {
    let invalid = |e: &dyn std::fmt::Display| {
        pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            format!("adding a response header: {e}"),
        )
    };
    h.reserve(ours.len() + 1);
    for (k, v) in ours {
        // Every response carries the request id: its name is not parsed again each time.
        let name = if *k == X_REQUEST_ID.as_str() {
            X_REQUEST_ID
        } else {
            HeaderName::from_bytes(k.as_bytes()).map_err(|e| invalid(&e))?
        };
        if name == X_REQUEST_ID {
            // The client gets its own id back; the provider's id (which its support asks
            // for) stays available under another name.
            if let Some(theirs) = h.remove(&X_REQUEST_ID) {
                h.insert(X_UPSTREAM_REQUEST_ID, theirs);
            }
        }
        let value = if name == header::VARY {
            // Keep the upstream's Vary (e.g. Accept-Encoding) and add ours to it.
            match h.get(header::VARY).and_then(|x| x.to_str().ok()) {
                Some(theirs) if !theirs.split(',').any(|t| t.trim().eq_ignore_ascii_case(v)) => {
                    format!("{theirs}, {v}")
                }
                Some(theirs) => theirs.to_string(),
                None => v.clone(),
            }
        } else {
            v.clone()
        };
        let value = http::HeaderValue::try_from(value).map_err(|e| invalid(&e))?;
        h.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_endpoint;

    fn client_request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut client = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            client.append_header(k.to_string(), *v).unwrap();
        }
        client
    }

    #[test]
    fn api_request_drops_client_credentials_and_hop_by_hop() {
        let client = client_request(&[
            ("authorization", "Bearer client-secret"),
            ("x-api-key", "client-secret"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("content-length", "999"),
            ("anthropic-version", "2023-06-01"),
            ("x-custom", "kept"),
            ("host", "proxy.local"),
        ]);
        let ep = parse_endpoint("http://10.0.0.1:8000/base").unwrap();
        let client = ClientHead::of(&client, &[]);
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
    fn h1_head_is_the_same_request_in_wire_form() {
        let client = client_request(&[
            ("authorization", "Bearer client-secret"),
            ("x-request-id", "from-client"),
            ("x-custom", "kept"),
            ("content-length", "999"),
            ("host", "proxy.local"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
        ]);
        let ep = parse_endpoint("http://10.0.0.1:8000/base").unwrap();
        let ours = [
            (X_REQUEST_ID, http::HeaderValue::from_static("ours")),
            (
                HeaderName::from_static("x-forwarded-for"),
                http::HeaderValue::from_static("192.0.2.1"),
            ),
        ];
        let mut buf = bytes::BytesMut::new();
        let client = ClientHead::of(&client, &ours);
        api_request_h1_head(
            &mut buf,
            &client,
            "/v1/chat/completions?x=1",
            &ep,
            None,
            42,
            &ours,
        )
        .unwrap();
        let head = std::str::from_utf8(&buf).unwrap();
        assert!(
            head.starts_with(
                "POST /base/v1/chat/completions?x=1 HTTP/1.1\r\nHost: 10.0.0.1:8000\r\n"
            ),
            "{head}"
        );
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(head.contains("\r\nx-custom: kept\r\n"), "{head}");
        assert!(
            head.contains("\r\nx-forwarded-for: 192.0.2.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nContent-Length: 42\r\n"), "{head}");
        assert_eq!(head.matches("x-request-id: ").count(), 1, "{head}");
        assert!(head.contains("x-request-id: ours\r\n"), "{head}");
        for gone in [
            "client-secret",
            "from-client",
            "999",
            "proxy.local",
            "x-drop-me",
            "onnection",
        ] {
            assert!(!head.contains(gone), "{gone} in {head}");
        }
        // A target with a delimiter byte is refused rather than written.
        let bad = api_request_h1_head(&mut buf, &client, "/v1/a b", &ep, None, 0, &[]);
        assert!(bad.is_err());
    }

    #[test]
    fn passthrough_rewrite_keeps_the_path_and_replaces_ours() {
        let mut req = RequestHeader::build("POST", b"/v1/files?purpose=x", None).unwrap();
        for (k, v) in [
            ("Authorization", "Bearer client-secret"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Custom", "kept"),
            ("Host", "proxy.local"),
        ] {
            req.append_header(k, v).unwrap();
        }
        // An h2 client's request keeps its END_STREAM choice.
        req.set_version(http::Version::HTTP_2);
        req.set_send_end_stream(false);
        let ep = parse_endpoint("http://10.0.0.1:8000").unwrap();
        let ours = [(
            HeaderName::from_static("x-forwarded-for"),
            http::HeaderValue::from_static("192.0.2.1"),
        )];
        rewrite_passthrough_request(&mut req, "/v1/files?purpose=x", &ep, None, &ours).unwrap();
        assert_eq!(req.uri.to_string(), "/v1/files?purpose=x");
        assert!(req.headers.get("authorization").is_none());
        assert_eq!(req.headers["x-forwarded-for"], "192.0.2.1");
        assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(req.headers["x-custom"], "kept");
        assert_eq!(req.headers["host"], "10.0.0.1:8000");
        assert_eq!(req.send_end_stream(), Some(false));

        let ep = parse_endpoint("http://10.0.0.1:8000/base").unwrap();
        rewrite_passthrough_request(&mut req, "/v1/files", &ep, None, &ours).unwrap();
        assert_eq!(req.uri.to_string(), "/base/v1/files");
    }

    #[test]
    fn ours_keep_the_upstream_request_id_and_vary() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("X-Request-Id", "provider-1").unwrap();
        resp.append_header("Vary", "Accept-Encoding").unwrap();
        let ours = [
            ("x-request-id", "req_1".to_string()),
            ("vary", "Origin".to_string()),
        ];
        add_ours(&mut resp, &ours).unwrap();
        assert_eq!(resp.headers["x-request-id"], "req_1");
        assert_eq!(resp.headers["x-upstream-request-id"], "provider-1");
        assert_eq!(resp.headers["vary"], "Accept-Encoding, Origin");
        assert!(add_ours(&mut resp, &[("bad name", "x".into())]).is_err());
    }

    #[test]
    fn response_keeps_length_and_drops_hop_by_hop() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.append_header("content-length", "10").unwrap();
        up.append_header("connection", "close").unwrap();
        up.append_header("x-request-id", "abc").unwrap();
        let d = downstream_response(up, &[]).unwrap();
        assert_eq!(d.headers["content-length"], "10");
        assert!(d.headers.get("connection").is_none());
        assert_eq!(d.headers["x-request-id"], "abc");
    }
}
