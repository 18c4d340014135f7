//! The YAML file as written: plain serde structs, unknown keys rejected.

use super::units::{HumanDuration, HumanSize};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Top level of the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Addresses the proxy listens on (plain or TLS).
    #[serde(default = "default_listen")]
    pub listen: Vec<RawListen>,
    /// Peers whose forwarding headers (X-Forwarded-For, X-Real-IP, Forwarded) are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Client authentication.
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// Cross-origin requests from browsers.
    #[serde(default)]
    pub cors: Option<RawCors>,
    /// Where hostname endpoints may connect.
    #[serde(default)]
    pub egress: RawEgress,
    /// Resolver settings for hostname endpoints.
    #[serde(default)]
    pub dns: RawDns,
    /// Admin listener (/metrics, /health/*, /admin/*).
    #[serde(default)]
    pub admin: RawAdmin,
    /// Access log.
    #[serde(default)]
    pub access_log: Option<RawAccessLog>,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: RawShutdown,
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

fn default_listen() -> Vec<RawListen> {
    vec![RawListen::Addr("127.0.0.1:8080".to_string())]
}

/// One `listen:` entry: `"IP:PORT"` or `{addr, tls: {cert, key}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawListen {
    /// Plain HTTP/1.1.
    Addr(String),
    /// An address with options.
    Full(RawListenFull),
}

/// A listener written as an object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenFull {
    /// `IP:PORT`.
    pub addr: String,
    /// TLS termination (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<RawListenTls>,
}

/// `tls:` of a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenTls {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

/// `auth:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `keys` (default when keys are listed) or `open` (no client authentication).
    pub mode: Option<AuthMode>,
    /// Client keys.
    #[serde(default)]
    pub keys: Vec<RawClientKey>,
}

/// `auth.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every API request needs a listed key.
    Keys,
    /// Anyone may call (a warning is logged at start).
    Open,
}

/// One client key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientKey {
    /// Name shown in logs, metrics, traces and the ledger.
    pub id: String,
    /// The key (usually `os.environ/NAME`).
    pub key: Option<String>,
    /// Hex SHA-256 of the key, so the file holds no secret.
    pub key_sha256: Option<String>,
    /// Models this key may use (default: all).
    pub models: Option<Vec<String>>,
    /// Limits for this key.
    pub rate_limit: Option<RawRateLimit>,
}

/// `rate_limit:` of a client key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens (prompt + completion) per minute, from observed usage.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrent: Option<u32>,
}

/// `cors:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Exact origins allowed (`*` allowed only without credentials).
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Methods allowed in preflights.
    pub allow_methods: Option<Vec<String>>,
    /// Request headers allowed in preflights.
    pub allow_headers: Option<Vec<String>>,
    /// Response headers exposed to scripts.
    pub expose_headers: Option<Vec<String>>,
    /// Send `Access-Control-Allow-Credentials: true`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight.
    pub max_age: Option<HumanDuration>,
}

/// `egress:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    /// Ranges hostname endpoints may resolve to even when private.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
}

/// `dns:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// Nameservers (`IP` or `IP:PORT`); default: the system resolver configuration.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Per-query timeout.
    pub timeout: Option<HumanDuration>,
}

/// `admin:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Admin listener address (default 127.0.0.1:9090).
    pub listen: Option<String>,
    /// Bearer key required on the admin listener (mandatory when it is not loopback).
    pub key: Option<String>,
}

/// `access_log:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// `stderr`, `off`, or a file path.
    pub path: String,
    /// `combined` (nginx) or `json`.
    pub format: Option<AccessLogFormat>,
    /// Lines queued for the writer before new ones are dropped.
    pub queue: Option<usize>,
}

/// `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// nginx's `combined` format.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// `shutdown:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// How long open requests and streams may finish after SIGTERM.
    pub grace_period: Option<HumanDuration>,
}

/// `health_check:` of an upstream (active checks of every replica).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// Path requested with GET (e.g. `/health` or `/v1/models`).
    pub path: String,
    /// Time between two checks of a replica.
    pub interval: Option<HumanDuration>,
    /// Timeout of one check.
    pub timeout: Option<HumanDuration>,
    /// Consecutive failures before a replica is taken out.
    pub unhealthy_after: Option<u32>,
    /// Consecutive successes before it is put back.
    pub healthy_after: Option<u32>,
}

/// `passive_health:` of an upstream (ejection from live traffic).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassiveHealth {
    /// Consecutive connect failures or 5xx answers before a replica is ejected.
    pub failures: Option<u32>,
    /// How long an ejected replica is skipped.
    pub eject_for: Option<HumanDuration>,
}

/// `limits:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request body accepted on API routes.
    pub max_body: Option<HumanSize>,
    /// Longest rLLM metadata slug / session id accepted in a path.
    pub max_slug: Option<HumanSize>,
    /// Longest request URI (path and query).
    pub max_uri: Option<HumanSize>,
    /// Most request header fields.
    pub max_headers: Option<usize>,
    /// Largest request header block (names and values).
    pub max_header_bytes: Option<HumanSize>,
    /// Longest silence while reading a request body.
    pub body_timeout: Option<HumanDuration>,
    /// Slowest average request-body rate accepted once `body_timeout` has passed.
    pub min_body_rate: Option<HumanSize>,
    /// Most requests in flight at once across all clients.
    pub max_concurrent_requests: Option<usize>,
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
    /// Hostname endpoints may resolve to private, loopback or link-local addresses.
    #[serde(default)]
    pub allow_private: bool,
    /// Active health checks.
    pub health_check: Option<RawHealthCheck>,
    /// Passive ejection of failing replicas.
    #[serde(default)]
    pub passive_health: RawPassiveHealth,
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
    /// Whether idle worker threads take work queued on busy ones (default: on with more
    /// than one thread).
    pub work_stealing: Option<bool>,
    /// PID file (daemon mode and upgrades).
    pub pid_file: Option<String>,
    /// Socket used to hand listeners to a new process on upgrade.
    pub upgrade_sock: Option<String>,
}

/// `demo_upstream:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemoUpstream {
    /// Where the built-in mock listens.
    pub listen: String,
}
