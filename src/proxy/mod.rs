//! `EdgeProxy`: the Pingora `ProxyHttp` implementation. Hooks stay thin; the work lives in
//! [`api_call`], [`forward`], [`passthrough`] and [`headers`].

pub mod api_call;
pub mod ctx;
pub mod forward;
pub mod headers;
pub mod passthrough;
pub mod respond;

use crate::error::EdgeError;
use crate::observe::ledger::Ledger;
use crate::route::api::{self, ApiPath};
use crate::route::slug;
use crate::snapshot::SharedSnapshot;
use crate::trace::Tracer;
use async_trait::async_trait;
use ctx::RequestCtx;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;

/// The proxy service.
pub struct EdgeProxy {
    state: SharedSnapshot,
    connector: Arc<Connector>,
    tracer: Arc<Tracer>,
    ledger: Option<Arc<Ledger>>,
}

impl EdgeProxy {
    /// A proxy over the shared config snapshot, with its own pooled connector for API calls.
    pub fn new(state: SharedSnapshot, tracer: Arc<Tracer>, ledger: Option<Arc<Ledger>>) -> Self {
        Self {
            state,
            connector: Arc::new(Connector::new(None)),
            tracer,
            ledger,
        }
    }
}

/// A pingora error that carries our error code for `fail_to_proxy` / logging.
fn edge_to_pingora(e: &EdgeError) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(e.status()), e.message())
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::new()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        let snap = self.state.load_full();
        ctx.snapshot = Some(snap.clone());
        let meta = match slug::extract(session.req_header().uri.path(), snap.cfg.limits.max_slug) {
            Ok(m) => m,
            Err(e) => {
                ctx.error_code = Some(e.code());
                respond::error(session, &e).await?;
                return Ok(true);
            }
        };
        let path = meta.path.clone();
        if crate::admin::is_admin_path(&path) {
            crate::admin::handle(session, &path, &self.tracer, self.ledger.as_deref(), &snap)
                .await?;
            return Ok(true);
        }
        let path_and_query = match session.req_header().uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let method = session.req_header().method.clone();
        let result = match api::classify(&path) {
            ApiPath::Call(endpoint) if method == http::Method::POST => {
                // Boxed: the API-call future is large, and Pingora moves the request future
                // around; a pointer is cheaper to move (memmove showed in profiles).
                let r = Box::pin(api_call::handle(
                    session,
                    &self.connector,
                    &self.tracer,
                    self.ledger.as_deref(),
                    &snap,
                    endpoint,
                    &path_and_query,
                    &meta,
                    ctx,
                ))
                .await;
                ctx.path_meta = Some(meta);
                r
            }
            ApiPath::ListModels if method == http::Method::GET => {
                respond::json(session, 200, snap.models_body.clone()).await?;
                return Ok(true);
            }
            ApiPath::Call(_) | ApiPath::ListModels if snap.routes.route(&path).is_none() => {
                Err(EdgeError::MethodNotAllowed(method.to_string()))
            }
            _ => match passthrough::plan(&snap, &path_and_query) {
                Some(pt) => {
                    ctx.upstream = Some(pt.upstream.cfg.name.clone());
                    ctx.pass_through = Some(pt);
                    ctx.path_meta = Some(meta);
                    return Ok(false);
                }
                None => Err(EdgeError::UnknownPath(path)),
            },
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) => {
                ctx.error_code = Some(e.code());
                match &e {
                    EdgeError::ClientClosed => {
                        tracing::debug!(request_id = %ctx.request_id, "client went away")
                    }
                    e if e.status() >= 500 => tracing::warn!(
                        request_id = %ctx.request_id,
                        model = ctx.model.as_deref().unwrap_or("-"),
                        upstream = ctx.upstream.as_deref().unwrap_or("-"),
                        replica = ctx.replica.as_deref().unwrap_or("-"),
                        "{e}"
                    ),
                    _ => {}
                }
                if ctx.responded {
                    // The stream already started and was ended with an error event: abort it.
                    return Err(edge_to_pingora(&e));
                }
                if matches!(e, EdgeError::ClientClosed) {
                    return Err(edge_to_pingora(&e));
                }
                if matches!(e, EdgeError::BodyTooLarge { .. }) {
                    // The rest of the body is unread: do not reuse the connection.
                    session.set_keepalive(None);
                }
                respond::error(session, &e).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(pt) = ctx.pass_through.as_mut() else {
            return Error::e_explain(ErrorType::InternalError, "no pass-through route decided");
        };
        let Some(replica) = pt.upstream.select_replica(&pt.tried, None) else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!(
                    "upstream {:?} has no available replica",
                    pt.upstream.cfg.name
                ),
            );
        };
        if let Some(a) = replica.peer._address.as_inet() {
            pt.tried.push(*a);
        }
        ctx.replica = Some(replica.label.clone());
        let peer = Box::new(replica.peer.clone());
        pt.replica = Some(replica);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let Some(pt) = ctx.pass_through.as_ref() else {
            return Ok(());
        };
        let Some(replica) = pt.replica.as_ref() else {
            return Ok(());
        };
        let key = pt.upstream.keys.pick();
        ctx.key_id = key.map(|k| k.id.clone());
        headers::rewrite_passthrough_request(req, &pt.path_and_query, &replica.endpoint, key)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(pt) = ctx.pass_through.as_ref() {
            if let Some(r) = pt.replica.as_ref() {
                r.mark_connect_failure();
            }
            let more = pt.tried.len() < pt.upstream.cfg.max_attempts
                && pt.upstream.select_replica(&pt.tried, None).is_some();
            if more {
                e.set_retry(true);
            }
        }
        e
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, e: &Error) -> bool {
        // A client that goes away, or a failure already answered with our own error, is not
        // an error of the proxy: logged at debug level instead.
        let client_gone = e.esource() == &pingora::ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        let ours = ctx.error_code.is_some();
        if client_gone || ours {
            tracing::debug!(request_id = %ctx.request_id, "request ended early: {e}");
        }
        client_gone || ours
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        if ctx.responded || session.response_written().is_some() {
            // Mid-stream failure: nothing more can be said; closing aborts the body.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let edge = match e.etype() {
            ErrorType::HTTPStatus(code) if *code == 499 => None,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &pingora::ErrorSource::Upstream =>
            {
                Some(EdgeError::UpstreamTimeout(e.etype().as_str().to_string()))
            }
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => Some(EdgeError::UpstreamUnreachable(
                    e.etype().as_str().to_string(),
                )),
                pingora::ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(EdgeError::BadRequest(e.etype().as_str().to_string())),
                },
                _ => Some(EdgeError::Internal(e.etype().as_str().to_string())),
            },
        };
        let code = match edge {
            Some(err) => {
                ctx.error_code = Some(err.code());
                if let Err(we) = respond::error(session, &err).await {
                    tracing::debug!("could not send the error response: {we}");
                }
                err.status()
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
