//! Admin endpoints. Until the separate admin listener exists they are served on the main
//! listener, to loopback clients only.

pub mod keys;
pub mod traces;

use crate::error::EdgeError;
use crate::observe::ledger::Ledger;
use crate::proxy::respond;
use crate::snapshot::Snapshot;
use crate::trace::Tracer;
use pingora::proxy::Session;

/// Whether `path` is an admin path.
pub fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// Answers an admin request.
pub async fn handle(
    session: &mut Session,
    path: &str,
    tracer: &Tracer,
    ledger: Option<&Ledger>,
    snap: &Snapshot,
) -> pingora::Result<()> {
    let loopback = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .is_some_and(|a| a.ip().is_loopback());
    if !loopback {
        let e = EdgeError::UnknownPath(path.to_string());
        return respond::error(session, &e).await;
    }
    let method = session.req_header().method.clone();
    let query = session.req_header().uri.query().unwrap_or("").to_string();
    let result = match (method.as_str(), path) {
        ("POST", "/admin/traces/flush") => traces::flush(tracer).await,
        ("GET", "/admin/traces") => traces::list(tracer, &query).await,
        ("GET", p) if p.starts_with("/admin/traces/") => {
            traces::one(tracer, &p["/admin/traces/".len()..]).await
        }
        ("GET", "/admin/keys") => keys::list(snap),
        ("GET", "/admin/usage") => usage(ledger, &query),
        ("POST", p) if p.starts_with("/admin/keys/") => {
            keys::reset(snap, &p["/admin/keys/".len()..])
        }
        _ => Err(EdgeError::UnknownPath(path.to_string())),
    };
    match result {
        Ok(body) => respond::json(session, 200, body).await,
        Err(e) => respond::error(session, &e).await,
    }
}

/// Parses `a=1&b=x%20y` into decoded pairs.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// `GET /admin/usage?group_by=key|model|client|upstream&since=UNIX_SECONDS`.
fn usage(ledger: Option<&Ledger>, query: &str) -> Result<bytes::Bytes, EdgeError> {
    let Some(ledger) = ledger else {
        return Err(EdgeError::BadRequest(
            "usage accounting is off (no usage: section)".into(),
        ));
    };
    let mut group_by = "key".to_string();
    let mut since = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "group_by" if ["key", "model", "client", "upstream"].contains(&v.as_str()) => {
                group_by = v
            }
            "group_by" => {
                return Err(EdgeError::BadRequest(
                    "group_by must be key, model, client or upstream".into(),
                ))
            }
            "since" => {
                since = Some(v.parse::<f64>().map_err(|_| {
                    EdgeError::BadRequest("since must be a Unix timestamp in seconds".into())
                })? as u64)
            }
            other => {
                return Err(EdgeError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    let rows: Vec<serde_json::Value> = ledger
        .summary(&group_by, since)
        .into_iter()
        .map(|(g, c)| {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(group_by.clone(), serde_json::Value::from(g));
            }
            v
        })
        .collect();
    Ok(bytes::Bytes::from(
        serde_json::json!({"object": "list", "group_by": group_by, "data": rows}).to_string(),
    ))
}
