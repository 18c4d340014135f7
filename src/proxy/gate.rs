//! Checks every request passes before it is routed: request id, client address, limits,
//! client key and its rate limits. Plain functions over plain inputs.

use super::ctx::{ClientRef, RequestCtx};
use crate::config::Limits;
use crate::error::EdgeError;
use crate::security::{client_addr, rate};
use crate::snapshot::Snapshot;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// Longest client-supplied request id kept (longer ones are replaced by ours).
const MAX_REQUEST_ID: usize = 128;

/// The client's `X-Request-Id` when it is short printable ASCII, else a new id.
pub fn request_id(req: &RequestHeader) -> String {
    match req.headers.get("x-request-id").map(|v| v.as_bytes()) {
        Some(v)
            if !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.iter().all(|b| b.is_ascii_graphic()) =>
        {
            String::from_utf8_lossy(v).into_owned()
        }
        _ => crate::ids::new_id("req_"),
    }
}

/// URI length (414), header count and size (431).
pub fn check_limits(req: &RequestHeader, limits: &Limits) -> Result<(), EdgeError> {
    let uri_len = req
        .uri
        .path_and_query()
        .map(|p| p.as_str().len())
        .unwrap_or(0);
    if uri_len > limits.max_uri {
        return Err(EdgeError::UriTooLong {
            limit: limits.max_uri,
        });
    }
    if req.headers.len() > limits.max_headers {
        return Err(EdgeError::HeadersTooLarge(format!(
            "more than {} request header fields",
            limits.max_headers
        )));
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > limits.max_header_bytes {
        return Err(EdgeError::HeadersTooLarge(format!(
            "request headers exceed {} bytes",
            limits.max_header_bytes
        )));
    }
    Ok(())
}

/// Fills the client address and the headers sent upstream (forwarding headers, request id).
pub fn client_address(
    snap: &Snapshot,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    tls: bool,
    ctx: &mut RequestCtx,
) {
    let id = HeaderValue::from_str(&ctx.request_id)
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    let Some(peer) = peer else {
        ctx.upstream_headers.push((X_REQUEST_ID, id));
        return;
    };
    let nets = &snap.cfg.trusted_proxies;
    let client = client_addr::real_client(peer, &req.headers, nets);
    ctx.client_addr = Some(client);
    ctx.upstream_headers.reserve_exact(5);
    ctx.upstream_headers.extend(client_addr::upstream_headers(
        peer,
        client,
        &req.headers,
        nets,
        tls,
    ));
    ctx.upstream_headers.push((X_REQUEST_ID, id));
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Authenticates the client and charges its rate limits (401, 429).
pub fn admit_client(
    snap: &Snapshot,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    let Some(key) = snap.auth.authenticate(&req.headers)? else {
        return Ok(());
    };
    let Some(usage) = snap.client_usage.get(&key.id) else {
        return Err(EdgeError::Internal(format!(
            "no usage state for client key {:?}",
            key.id
        )));
    };
    ctx.client = Some(ClientRef {
        id: key.id.clone(),
        models: key.models.clone(),
        limit: key.rate_limit,
        usage: usage.clone(),
    });
    let admitted = rate::admit(usage, &key.rate_limit)?;
    ctx.slots.1 = admitted.slot;
    ctx.response_headers.extend(admitted.headers);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        crate::config::from_yaml_str(
            "auth: {mode: open}\nlimits: {max_uri: 64, max_headers: 3, max_header_bytes: 100}\n",
            &|_| None,
        )
        .unwrap()
        .limits
    }

    #[test]
    fn limits_answer_414_and_431() {
        let l = limits();
        let ok = RequestHeader::build("GET", b"/v1/models", None).unwrap();
        assert!(check_limits(&ok, &l).is_ok());
        let long =
            RequestHeader::build("GET", format!("/{}", "a".repeat(64)).as_bytes(), None).unwrap();
        assert_eq!(check_limits(&long, &l).unwrap_err().status(), 414);
        let mut many = ok.clone();
        for i in 0..4 {
            many.append_header(format!("x-h{i}"), "1").unwrap();
        }
        assert_eq!(check_limits(&many, &l).unwrap_err().status(), 431);
        let mut big = ok.clone();
        big.append_header("x-big", "b".repeat(100)).unwrap();
        assert_eq!(check_limits(&big, &l).unwrap_err().status(), 431);
    }

    #[test]
    fn request_id_is_kept_when_sane() {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        assert!(request_id(&r).starts_with("req_"));
        r.insert_header("x-request-id", "abc-123").unwrap();
        assert_eq!(request_id(&r), "abc-123");
        r.insert_header("x-request-id", "a b").unwrap();
        assert!(request_id(&r).starts_with("req_"));
    }
}
