//! Models and pass-through routes of one config snapshot.

use crate::config::{Config, ModelConfig, RouteConfig};
use std::collections::HashMap;

/// Lookup tables built once per config snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// (foldhash: looked up on every call; the keys are the config's names.)
    models: HashMap<String, ModelConfig, foldhash::fast::RandomState>,
    model_order: Vec<String>,
    /// Routes sorted by prefix length, longest first.
    routes: Vec<RouteConfig>,
}

impl RouteTable {
    /// Builds the tables from a validated config.
    pub fn new(cfg: &Config) -> Self {
        let models = cfg
            .models
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect();
        let model_order = cfg.models.iter().map(|m| m.name.clone()).collect();
        let mut routes = cfg.routes.clone();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self {
            models,
            model_order,
            routes,
        }
    }

    /// The model a client asked for.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.get(name)
    }

    /// Model names in config order.
    pub fn model_names(&self) -> impl Iterator<Item = &ModelConfig> {
        self.model_order.iter().filter_map(|n| self.models.get(n))
    }

    /// The longest pass-through route whose prefix matches `path`.
    pub fn route(&self, path: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| path.starts_with(&r.prefix))
    }
}

/// The path a pass-through route forwards: the prefix removed when asked, always starting
/// with `/`, the query string kept.
pub fn rewrite_path(route: &RouteConfig, path_and_query: &str) -> String {
    if !route.strip_prefix {
        return path_and_query.to_string();
    }
    let rest = path_and_query
        .strip_prefix(route.prefix.as_str())
        .unwrap_or(path_and_query);
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        ["/", rest].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, strip: bool) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            upstream: "u".into(),
            strip_prefix: strip,
        }
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_query() {
        assert_eq!(
            rewrite_path(&route("/raw/", true), "/raw/v1/x?a=1"),
            "/v1/x?a=1"
        );
        assert_eq!(rewrite_path(&route("/raw", true), "/raw/v1/x"), "/v1/x");
        assert_eq!(rewrite_path(&route("/raw/", true), "/raw/"), "/");
        assert_eq!(rewrite_path(&route("/raw/", false), "/raw/v1"), "/raw/v1");
    }

    #[test]
    fn longest_prefix_wins() {
        let cfg = crate::config::from_yaml_str(
            "auth: {mode: open}\nupstreams: {u: {kind: vllm, endpoints: ['http://127.0.0.1:1']}}\nroutes:\n  - {prefix: /a/, upstream: u}\n  - {prefix: /a/b/, upstream: u, strip_prefix: true}\n",
            &|_| None,
        )
        .unwrap();
        let t = RouteTable::new(&cfg);
        assert_eq!(t.route("/a/b/c").unwrap().prefix, "/a/b/");
        assert_eq!(t.route("/a/c").unwrap().prefix, "/a/");
        assert!(t.route("/z").is_none());
    }
}
