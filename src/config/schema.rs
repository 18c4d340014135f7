//! The YAML file as written: plain serde structs, unknown keys rejected.

use super::units::{HumanDuration, HumanSize};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Top level of the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Addresses the proxy listens on.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Request limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// Named upstreams.
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    /// Models clients may ask for.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Pass-through routes by path prefix.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Process settings.
    #[serde(default)]
    pub server: RawServer,
    /// Built-in OpenAI-compatible mock upstream, for demos and smoke tests.
    #[serde(default)]
    pub demo_upstream: Option<RawDemoUpstream>,
    /// Call traces.
    #[serde(default)]
    pub tracing: Option<RawTracing>,
    /// Usage accounting.
    #[serde(default)]
    pub usage: Option<RawUsage>,
}

/// `usage:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    /// Ledger file (JSON); in memory only when absent.
    pub ledger: Option<String>,
    /// Longest time a change waits before the file is rewritten.
    pub flush_interval: Option<HumanDuration>,
    /// Ask openai/vllm upstreams for the usage chunk on streams (default true); the client
    /// does not see it unless it asked.
    pub inject_include_usage: Option<bool>,
}

/// `tracing:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// always | when_metadata | never.
    pub mode: Option<crate::trace::TraceMode>,
    /// SQLite store (rLLM tables).
    pub sqlite: Option<String>,
    /// JSON Lines file.
    pub jsonl: Option<String>,
    /// Rotate the JSONL file above this size.
    pub jsonl_max_size: Option<HumanSize>,
    /// Rotated JSONL files kept.
    pub jsonl_keep: Option<usize>,
    /// Queue capacity in records.
    pub queue: Option<usize>,
    /// URL that receives batches of records as JSON arrays (HTTP POST).
    pub collector: Option<String>,
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:8080".to_string()]
}

/// `limits:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request body accepted on API routes.
    pub max_body: Option<HumanSize>,
    /// Longest rLLM metadata slug / session id accepted in a path.
    pub max_slug: Option<HumanSize>,
}

/// Upstream kind: decides credentials and accepted fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI's API.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// vLLM or any OpenAI-compatible server.
    Vllm,
}

impl UpstreamKind {
    /// Lowercase name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Vllm => "vllm",
        }
    }
}

/// One entry of `upstreams:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// openai | anthropic | vllm.
    pub kind: UpstreamKind,
    /// Replica base URLs.
    pub endpoints: Vec<String>,
    /// Upstream credentials.
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// How a key is chosen for each request.
    #[serde(default)]
    pub key_strategy: KeyStrategy,
    /// Request header whose value pins a session for `key_strategy: session`.
    pub session_header: Option<String>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Retry policy.
    #[serde(default)]
    pub retries: RawRetries,
    /// Concurrent streams per HTTP/2 connection to this upstream.
    pub max_h2_streams: Option<usize>,
    /// TLS options for https endpoints.
    #[serde(default)]
    pub tls: RawTls,
    /// How often hostnames are re-resolved.
    pub dns_refresh: Option<HumanDuration>,
    /// Sampling policy for every model on this upstream (models may override per field).
    pub sampling: Option<RawSampling>,
    /// Whether rLLM path metadata is forwarded in the body (`body`) or not (`none`, default).
    pub forward_metadata: Option<ForwardMetadata>,
}

/// `forward_metadata:` of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMetadata {
    /// Not forwarded (OpenAI rejects foreign `metadata`).
    None,
    /// Added to the body as `metadata.rllm_metadata`.
    Body,
}

/// `sampling:` of a model or upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSampling {
    /// Fields set when the client did not send them.
    #[serde(default)]
    pub set_if_absent: BTreeMap<String, serde_json::Value>,
    /// Fields always set.
    #[serde(default, rename = "override")]
    pub override_: BTreeMap<String, serde_json::Value>,
    /// Fields removed.
    #[serde(default)]
    pub drop: Vec<String>,
}

/// A key: a bare secret, or an object with an id.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawKey {
    /// `- os.environ/NAME`
    Bare(String),
    /// `- {id: team-a, key: os.environ/NAME}`
    Full(RawKeyFull),
}

/// A key written as an object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyFull {
    /// Stable name shown in logs and metrics.
    pub id: Option<String>,
    /// The secret (usually an env reference).
    pub key: String,
    /// Relative share of traffic (default 1).
    pub weight: Option<u32>,
    /// Most requests in flight on this key at once.
    pub max_concurrent: Option<u32>,
    /// Models this key may serve (default: all).
    pub models: Option<Vec<String>>,
}

/// `key_strategy:` of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    /// Rotate through eligible keys (weighted).
    #[default]
    RoundRobin,
    /// Fewest requests in flight; ties by weight.
    LeastBusy,
    /// Stick to one key until it cools down (keeps provider prompt caches warm).
    Sequential,
    /// Consistent hash of the rLLM session (or `session_header`): a session sticks to one key.
    Session,
}

/// `timeouts:` of an upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (+TLS) connect.
    pub connect: Option<HumanDuration>,
    /// From request sent to response header received.
    pub first_byte: Option<HumanDuration>,
    /// Longest gap between two response body reads.
    pub idle: Option<HumanDuration>,
    /// Whole exchange.
    pub total: Option<HumanDuration>,
}

/// `retries:` of an upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Attempts in all (first try included).
    pub max_attempts: Option<usize>,
    /// Time after which no new attempt starts.
    pub deadline: Option<HumanDuration>,
    /// Longest cooldown of a rate-limited key.
    pub max_cooldown: Option<HumanDuration>,
}

/// `tls:` of an upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Verify the upstream certificate (default true).
    pub verify: Option<bool>,
    /// SNI / verified name, when it differs from the endpoint host.
    pub sni: Option<String>,
}

/// One entry of `models:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// What clients put in `model`.
    pub name: String,
    /// Upstream serving it.
    pub upstream: String,
    /// Upstream model id, when different.
    pub model: Option<String>,
    /// Sampling policy (merged over the upstream's).
    pub sampling: Option<RawSampling>,
    /// Remove injected fields the client did not ask for from responses.
    #[serde(default)]
    pub strip_injected_fields: bool,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Path prefix, starting with `/`.
    pub prefix: String,
    /// Upstream receiving the traffic.
    pub upstream: String,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// `server:` section (process-level settings).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Worker threads of the proxy service.
    pub threads: Option<usize>,
    /// PID file (daemon mode and upgrades).
    pub pid_file: Option<String>,
    /// Socket used to hand listeners to a new process on upgrade.
    pub upgrade_sock: Option<String>,
    /// Grace period for open requests on shutdown.
    pub grace_period: Option<HumanDuration>,
}

/// `demo_upstream:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemoUpstream {
    /// Where the built-in mock listens.
    pub listen: String,
}
