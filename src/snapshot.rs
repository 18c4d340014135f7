//! Everything a request reads from config, built once per load and swapped atomically.

use crate::config::Config;
use crate::route::table::RouteTable;
use crate::security::auth::Authenticator;
use crate::security::rate::{ClientUsage, KeyUsage};
use crate::upstream::discovery::RefusalHook;
use crate::upstream::dns::Dns;
use crate::upstream::egress::EgressPolicy;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One immutable view of the configuration. A request loads it once and keeps it to the end.
pub struct Snapshot {
    /// The validated config.
    pub cfg: Arc<Config>,
    /// Models and routes.
    pub routes: RouteTable,
    /// Upstreams by name (foldhash: looked up on every call; the keys are the config's names).
    pub upstreams: HashMap<String, Arc<Upstream>, foldhash::fast::RandomState>,
    /// Pre-rendered `GET /v1/models` body.
    pub models_body: Bytes,
    /// Client keys.
    pub auth: Authenticator,
    /// Usage state of each client key, by id (shared with earlier snapshots).
    pub client_usage: HashMap<String, Arc<KeyUsage>>,
}

/// What a snapshot build needs from the process: state carried across reloads.
pub struct BuildInputs<'a> {
    /// Client key usage (rate limits), by id.
    pub clients: &'a ClientUsage,
    /// Called when the egress policy refuses a resolved address.
    pub on_refusal: RefusalHook,
    /// The snapshot being replaced (key states carry over).
    pub previous: Option<&'a Snapshot>,
}

/// The shared, swappable current snapshot.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl Snapshot {
    /// Builds upstreams (replicas, peers, keys) and lookup tables from a validated config.
    pub fn build(cfg: Config, inputs: BuildInputs<'_>) -> Self {
        let dns = Arc::new(Dns::with_settings(cfg.dns.clone()));
        let egress = Arc::new(EgressPolicy::new(
            cfg.egress_allow.clone(),
            cfg.listen
                .iter()
                .map(|l| l.addr)
                .chain(std::iter::once(cfg.admin.listen))
                .collect(),
        ));
        let upstreams = cfg
            .upstreams
            .values()
            .map(|u| {
                let carried = inputs
                    .previous
                    .and_then(|p| p.upstreams.get(&u.name))
                    .map(|old| old.keys.states())
                    .unwrap_or_default();
                let up = Upstream::new(
                    u.clone(),
                    dns.clone(),
                    egress.clone(),
                    inputs.on_refusal.clone(),
                    &carried,
                );
                (u.name.clone(), Arc::new(up))
            })
            .collect();
        let auth = Authenticator::new(&cfg.auth);
        let client_usage = cfg
            .auth
            .keys
            .iter()
            .map(|k| (k.id.clone(), inputs.clients.state(&k.id)))
            .collect();
        let routes = RouteTable::new(&cfg);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let list = ModelList {
            object: "list",
            data: cfg
                .models
                .iter()
                .map(|m| ModelEntry {
                    id: &m.name,
                    object: "model",
                    created,
                    owned_by: &m.upstream,
                })
                .collect(),
        };
        let models_body = Bytes::from(serde_json::to_vec(&list).unwrap_or_default());
        Self {
            cfg: Arc::new(cfg),
            routes,
            upstreams,
            models_body,
            auth,
            client_usage,
        }
    }
}
