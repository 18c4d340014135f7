//! Pass-through routes: nginx-style prefix routing over Pingora's own proxy path.

use super::ctx::PassThrough;
use crate::route::table::rewrite_path;
use crate::snapshot::Snapshot;

/// The pass-through decision for a request, if a route matches. `path_and_query` is the
/// request's, with any rLLM metadata segments already stripped.
pub fn plan(snap: &Snapshot, path_and_query: &str) -> Option<PassThrough> {
    let path = path_and_query.split('?').next().unwrap_or(path_and_query);
    let route = snap.routes.route(path)?;
    let upstream = snap.upstreams.get(&route.upstream)?.clone();
    Some(PassThrough {
        upstream,
        path_and_query: rewrite_path(route, path_and_query),
        tried: Vec::with_capacity(2),
        replica: None,
    })
}
