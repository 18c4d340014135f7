//! The admin listener: `/health/live`, `/health/ready`, `/metrics`, `/admin/*`. It is a
//! separate Pingora service on `admin.listen` (loopback by default); with `admin.key` set every
//! path except the health checks needs `Authorization: Bearer <admin key>`.

pub mod health;
pub mod keys;
pub mod traces;

use crate::error::EdgeError;
use crate::observe::ledger::Ledger;
use crate::proxy::respond;
use crate::runtime::Runtime;
use crate::snapshot::Snapshot;
use crate::trace::Tracer;
use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The admin service (answers everything itself, never proxies).
pub struct AdminService {
    rt: Arc<Runtime>,
}

impl AdminService {
    /// An admin service over the process runtime.
    pub fn new(rt: Arc<Runtime>) -> Self {
        Self { rt }
    }
}

#[async_trait]
impl ProxyHttp for AdminService {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        let snap = self.rt.state.load_full();
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        let is_health = path.starts_with("/health/");
        if !is_health && !authorized(session.req_header(), &snap) {
            let e = EdgeError::Unauthorized("admin key required (Authorization: Bearer)".into());
            respond::error(session, &e).await?;
            return Ok(true);
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/health/live") => {
                respond::json(
                    session,
                    200,
                    bytes::Bytes::from_static(b"{\"status\":\"ok\"}"),
                )
                .await?
            }
            ("GET", "/health/ready") => {
                let (ready, body) = health::ready(&snap);
                respond::json(session, if ready { 200 } else { 503 }, body).await?
            }
            ("GET", "/metrics") => {
                let body = crate::observe::scrape(&self.rt);
                respond::text(session, 200, "text/plain; version=0.0.4", body).await?
            }
            ("POST", "/admin/reload") => match self.rt.reload().await {
                Ok(report) => {
                    let body = serde_json::json!({
                        "status": "reloaded",
                        "needs_restart": report.needs_restart,
                    });
                    respond::json(session, 200, bytes::Bytes::from(body.to_string())).await?
                }
                Err(why) => {
                    tracing::error!("reload refused; the running config is kept: {why}");
                    let e = EdgeError::BadRequest(format!("reload refused: {why}"));
                    respond::error(session, &e).await?
                }
            },
            _ => {
                handle(
                    session,
                    &path,
                    &self.rt.tracer,
                    self.rt.ledger.as_deref(),
                    &snap,
                )
                .await?
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the admin service never proxies")
    }
}

fn authorized(req: &pingora::http::RequestHeader, snap: &Snapshot) -> bool {
    let Some(key) = snap.cfg.admin.key.as_ref() else {
        return true;
    };
    let presented = req
        .headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|b| b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|b| b[7..].trim_ascii())
        .unwrap_or(b"");
    bool::from(presented.ct_eq(key.expose().as_bytes()))
}

/// Answers an `/admin/*` request.
pub async fn handle(
    session: &mut Session,
    path: &str,
    tracer: &Tracer,
    ledger: Option<&Ledger>,
    snap: &Snapshot,
) -> pingora::Result<()> {
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
