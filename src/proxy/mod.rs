//! `EdgeProxy`: the Pingora `ProxyHttp` implementation. Hooks stay thin; the work lives in
//! [`api_call`], [`forward`], [`passthrough`] and [`headers`].

pub mod api_call;
pub mod ctx;
pub mod forward;
pub mod front;
pub mod gate;
pub mod headers;
pub mod logging;
pub mod passthrough;
pub mod respond;

use crate::error::EdgeError;
use crate::observe::metrics::RequestKind;
use crate::route::api::{self, ApiEndpoint, ApiPath};
use crate::route::slug;
use crate::runtime::Runtime;
use crate::security::cors;
use crate::snapshot::Snapshot;
use crate::upstream::connector::UpstreamConnector;
use async_trait::async_trait;
use ctx::RequestCtx;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;

/// The proxy service. Clones share the runtime and the connection pool.
#[derive(Clone)]
pub struct EdgeProxy {
    rt: Arc<Runtime>,
    connector: Arc<UpstreamConnector>,
}

impl EdgeProxy {
    /// A proxy over the process runtime, with its own pooled connector for API calls.
    pub fn new(rt: Arc<Runtime>) -> Self {
        Self {
            rt,
            connector: Arc::new(UpstreamConnector::new()),
        }
    }
}

/// A pingora error that carries our error code for `fail_to_proxy` / logging.
fn edge_to_pingora(e: &EdgeError) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(e.status()), e.message())
}

/// Answers `e` as the request's response (with the request's extra headers).
async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &EdgeError,
) -> pingora::Result<bool> {
    ctx.error_code = Some(e.code());
    ctx.status = e.status();
    if matches!(
        e,
        EdgeError::BodyTooLarge { .. } | EdgeError::RequestTimeout(_) | EdgeError::Overloaded
    ) {
        // The rest of the request is unread (or we are shedding load): close the connection.
        session.set_keepalive(None);
    }
    respond::error_with(session, e, &ctx.response_headers).await?;
    Ok(true)
}

impl EdgeProxy {
    /// The request phase of every request: admission, limits, CORS, routing, then the answer
    /// (API calls, the model list, errors and small pass-through requests) or `Ok(false)` for
    /// Pingora's proxy path. `snap` is the configuration the whole request is judged by.
    /// `judged`: the front door already found, by [`takes_pingora_path`], that a pass-through
    /// request fits the forwarder (so the header checks are not run twice per request).
    pub(crate) async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: Arc<Snapshot>,
        judged: bool,
    ) -> pingora::Result<bool> {
        ctx.snapshot = Some(snap.clone());
        ctx.gauges.0 = Some(self.rt.metrics.request_guard());
        ctx.request_id = gate::request_id(session.req_header());
        ctx.response_headers
            .push(("x-request-id", ctx.request_id.clone()));
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        gate::client_address(&snap, session.req_header(), peer, tls, ctx);
        match self
            .rt
            .admit_request(snap.cfg.limits.max_concurrent_requests)
        {
            Some(g) => ctx.slots.0 = Some(g),
            None => return answer(session, ctx, &EdgeError::Overloaded).await,
        }
        if let Err(e) = gate::check_limits(session.req_header(), &snap.cfg.limits) {
            return answer(session, ctx, &e).await;
        }
        if let Some(c) = snap.cfg.cors.as_ref() {
            let req = session.req_header();
            if cors::is_preflight(&req.method, &req.headers) {
                return match cors::preflight(c, &req.headers) {
                    Ok(headers) => {
                        ctx.status = 204;
                        ctx.response_headers.extend(headers);
                        respond::empty(session, 204, &ctx.response_headers).await?;
                        Ok(true)
                    }
                    Err(e) => answer(session, ctx, &e).await,
                };
            }
            let extra = cors::response_headers(c, &req.headers);
            ctx.response_headers.extend(extra);
        }
        let meta = match slug::extract(session.req_header().uri.path(), snap.cfg.limits.max_slug) {
            Ok(m) => m,
            Err(e) => return answer(session, ctx, &e).await,
        };
        if let Err(e) = gate::admit_client(&snap, session.req_header(), ctx) {
            return answer(session, ctx, &e).await;
        }
        let path = meta.path.clone();
        // Joined by hand: `format!` cost about 1,500 instructions per call (callgrind S3).
        let path_and_query = match session.req_header().uri.query() {
            Some(q) => [path.as_str(), "?", q].concat(),
            None => path.clone(),
        };
        let method = session.req_header().method.clone();
        let result = match target(&snap, &path, &method) {
            Target::Call(endpoint) => {
                ctx.kind = RequestKind::Api;
                // Boxed: the API-call future is large, and Pingora moves the request future
                // around; a pointer is cheaper to move (memmove showed in profiles).
                let r = Box::pin(api_call::handle(
                    session,
                    &self.connector,
                    &self.rt,
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
            Target::Models => {
                ctx.kind = RequestKind::Models;
                ctx.path_meta = Some(meta);
                ctx.status = 200;
                respond::json_with(
                    session,
                    200,
                    snap.models_body.clone(),
                    &ctx.response_headers,
                )
                .await?;
                return Ok(true);
            }
            Target::WrongMethod => {
                ctx.path_meta = Some(meta);
                Err(EdgeError::MethodNotAllowed(method.to_string()))
            }
            Target::Other => match passthrough::plan(&snap, &path_and_query) {
                Some(pt) => {
                    ctx.kind = RequestKind::Passthrough;
                    ctx.upstream = Some(pt.upstream.cfg.name.clone());
                    ctx.path_meta = Some(meta);
                    if !judged
                        && !passthrough::fits_forwarder(session.req_header(), session.is_http2())
                    {
                        ctx.pass_through = Some(pt);
                        return Ok(false);
                    }
                    // Boxed, as the API call's future is (Pingora moves the request future).
                    Box::pin(passthrough::forward(
                        session,
                        &self.connector,
                        &snap,
                        &pt,
                        ctx,
                    ))
                    .await
                }
                None => {
                    ctx.path_meta = Some(meta);
                    Err(EdgeError::UnknownPath(path))
                }
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
                answer(session, ctx, &e).await
            }
        }
    }
}

/// How [`EdgeProxy::handle`] answers a request, from its path (metadata stripped) and method.
enum Target {
    /// An API call.
    Call(ApiEndpoint),
    /// The model list.
    Models,
    /// An API path with a method it does not take, and no pass-through route for it.
    WrongMethod,
    /// A pass-through route, or no route at all.
    Other,
}

fn target(snap: &Snapshot, path: &str, method: &http::Method) -> Target {
    match api::classify(path) {
        ApiPath::Call(endpoint) if method == http::Method::POST => Target::Call(endpoint),
        ApiPath::ListModels if method == http::Method::GET => Target::Models,
        ApiPath::Call(_) | ApiPath::ListModels if snap.routes.route(path).is_none() => {
            Target::WrongMethod
        }
        _ => Target::Other,
    }
}

/// Whether an HTTP/1 request takes Pingora's proxy path from its first byte: CONNECT (which
/// Pingora refuses), and pass-through requests the forwarder cannot take (large or chunked
/// uploads, `Expect`, upgrades). [`front`] answers everything else through
/// [`EdgeProxy::handle`] directly. Judged on the snapshot `handle` then uses, so the two agree.
pub(crate) fn takes_pingora_path(snap: &Snapshot, req: &RequestHeader) -> bool {
    if req.method == http::Method::CONNECT {
        return true;
    }
    if passthrough::fits_forwarder(req, false) {
        return false;
    }
    // A bad slug is answered by `handle`, as is every other error.
    let Ok(meta) = slug::extract(req.uri.path(), snap.cfg.limits.max_slug) else {
        return false;
    };
    match target(snap, &meta.path, &req.method) {
        Target::Other => passthrough::plan(snap, &meta.path).is_some(),
        _ => false,
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    // Boxed: Pingora keeps the context inline in its per-request futures, several copies
    // deep, so its size is paid per open stream on every route; a box costs 8 bytes there.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestCtx::new())
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // None: llm-edge never compresses a response (API call bodies are observed, pass-through
        // bodies go as the upstream sent them). Pingora's default is a disabled compression
        // module, whose context every request still builds and consults.
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        self.handle(session, ctx, self.rt.state.load_full(), false)
            .await
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
            // An upstream fault (502), not ours.
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                format!(
                    "upstream {:?} has no available replica",
                    pt.upstream.cfg.name
                ),
            )
            .into_up());
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
        ctx.upstream_started = Some(std::time::Instant::now());
        headers::rewrite_passthrough_request(
            req,
            &pt.path_and_query,
            &replica.endpoint,
            key,
            &ctx.upstream_headers,
        )
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        ctx.status = resp.status.as_u16();
        if let Some(t) = ctx.upstream_started {
            ctx.upstream_ttfb = Some(t.elapsed());
        }
        headers::add_ours(resp, &ctx.response_headers)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX)
    where
        Self::CTX: Send + Sync,
    {
        if ctx.kind == RequestKind::Passthrough {
            ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
        }
        logging::finish(&self.rt, session, ctx);
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
                if let Err(we) = respond::error_with(session, &err, &ctx.response_headers).await {
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
