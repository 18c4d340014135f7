//! Pass-through routes: nginx-style prefix routing over Pingora's own proxy path.

use super::ctx::PassThrough;
use crate::route::table::rewrite_path;
use crate::snapshot::Snapshot;
use pingora::http::RequestHeader;

/// The pass-through decision for a request, if a route matches.
pub fn plan(snap: &Snapshot, req: &RequestHeader) -> Option<PassThrough> {
    let route = snap.routes.route(req.uri.path())?;
    let upstream = snap.upstreams.get(&route.upstream)?.clone();
    let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Some(PassThrough {
        upstream,
        path_and_query: rewrite_path(route, pq),
        tried: Vec::with_capacity(2),
        replica: None,
    })
}
