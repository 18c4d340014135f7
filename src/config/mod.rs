//! Configuration: the YAML schema, env references, and validation into the model the proxy runs on.
//!
//! The file is deserialised into [`schema::RawConfig`] (unknown keys rejected, with the key path
//! named), then [`validate`] turns it into [`Config`]: secrets resolved, URLs parsed, references
//! checked. Nothing downstream re-checks config.

pub mod edge;
pub mod schema;
pub mod secret;
pub mod units;

use crate::shaping::sampling::{kind_accepts, Action, FieldPath, Policy};
use crate::trace::{TraceMode, TraceSettings};
use schema::{
    ForwardMetadata, KeyStrategy, RawConfig, RawKey, RawSampling, RawUpstream, UpstreamKind,
};
use secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

/// Default `limits.max_body`: 32 MiB.
pub const DEFAULT_MAX_BODY: usize = 32 << 20;

/// The validated configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listeners.
    pub listen: Vec<edge::Listener>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client authentication.
    pub auth: edge::AuthSettings,
    /// CORS policy (`None`: no CORS headers at all).
    pub cors: Option<edge::CorsSettings>,
    /// Ranges hostname endpoints may resolve to even when private.
    pub egress_allow: Vec<ipnet::IpNet>,
    /// Resolver settings.
    pub dns: edge::DnsSettings,
    /// Admin listener.
    pub admin: edge::AdminSettings,
    /// Access log (`None`: off).
    pub access_log: Option<edge::AccessLogSettings>,
    /// Things `-t` and start-up print as warnings (the config is still valid).
    pub warnings: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Models in file order.
    pub models: Vec<ModelConfig>,
    /// Pass-through routes in file order.
    pub routes: Vec<RouteConfig>,
    /// Process settings.
    pub server: ServerSettings,
    /// Address of the built-in demo upstream, if enabled.
    pub demo_upstream: Option<SocketAddr>,
    /// Call traces.
    pub tracing: TraceSettings,
    /// Usage accounting (`None`: off).
    pub usage: Option<UsageSettings>,
}

/// Validated `usage:` settings.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    /// Ledger file; in memory only when `None`.
    pub ledger: Option<PathBuf>,
    /// Debounce of ledger writes.
    pub flush_interval: Duration,
}

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted on API routes, in bytes.
    pub max_body: usize,
    /// Longest rLLM slug / session id in a path, in bytes.
    pub max_slug: usize,
    /// Longest request URI, in bytes (414 above).
    pub max_uri: usize,
    /// Most request header fields (431 above).
    pub max_headers: usize,
    /// Largest request header block, in bytes (431 above).
    pub max_header_bytes: usize,
    /// Longest silence while reading a request body (408).
    pub body_timeout: Duration,
    /// Slowest average body rate accepted after `body_timeout`, bytes/s (0: off).
    pub min_body_rate: u64,
    /// Most requests in flight (503 above; 0: unlimited).
    pub max_concurrent_requests: usize,
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name as written under `upstreams:`.
    pub name: String,
    /// API flavour.
    pub kind: UpstreamKind,
    /// Replicas.
    pub endpoints: Vec<Endpoint>,
    /// Credentials (may be empty).
    pub keys: Vec<UpstreamKey>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Attempts in all, first try included.
    pub max_attempts: usize,
    /// No new attempt starts after this long.
    pub retry_deadline: Duration,
    /// Longest cooldown of a rate-limited key.
    pub max_cooldown: Duration,
    /// Key selection strategy.
    pub key_strategy: KeyStrategy,
    /// Header pinning a session for the `session` strategy.
    pub session_header: Option<http::HeaderName>,
    /// Streams per h2 connection.
    pub max_h2_streams: usize,
    /// Verify upstream certificates.
    pub verify_tls: bool,
    /// SNI override.
    pub sni: Option<String>,
    /// Hostname re-resolution interval.
    pub dns_refresh: Duration,
    /// Upstream-level sampling policy (already merged into each model's).
    pub sampling: Policy,
    /// Forward rLLM metadata in the body as `metadata.rllm_metadata`.
    pub forward_metadata: bool,
    /// Hostname endpoints may resolve to non-public addresses.
    pub allow_private: bool,
    /// Active health checks.
    pub health_check: Option<HealthCheck>,
    /// Passive ejection.
    pub passive: PassiveHealth,
}

/// Active health check of every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path requested with GET.
    pub path: String,
    /// Time between two checks.
    pub interval: Duration,
    /// Timeout of one check.
    pub timeout: Duration,
    /// Consecutive failures before a replica is out.
    pub unhealthy_after: u32,
    /// Consecutive successes before it is back.
    pub healthy_after: u32,
}

/// Passive ejection from live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive connect failures / 5xx before ejection.
    pub failures: u32,
    /// How long an ejected replica is skipped.
    pub eject_for: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            failures: 3,
            eject_for: Duration::from_secs(10),
        }
    }
}

/// One replica base URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as written (no secrets in it).
    pub url: String,
    /// https?
    pub tls: bool,
    /// Host name or literal IP as written (no brackets).
    pub host: String,
    /// Port (explicit or the scheme's default).
    pub port: u16,
    /// Value for the `Host` header.
    pub authority: String,
    /// Path prefix prepended to forwarded paths ("" when none).
    pub base_path: String,
    /// Set when the host is a literal IP or `localhost`: no DNS needed.
    pub literal_ip: Option<IpAddr>,
}

/// One upstream credential.
#[derive(Debug, Clone)]
pub struct UpstreamKey {
    /// Stable id shown in logs and metrics.
    pub id: String,
    /// The secret.
    pub secret: Secret,
    /// Relative share of traffic.
    pub weight: u32,
    /// Most requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Models this key may serve (`None`: all).
    pub models: Option<Vec<String>>,
}

impl UpstreamKey {
    /// A key with default settings (weight 1, no limits).
    pub fn new(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Secret::new(secret.into()),
            weight: 1,
            max_concurrent: None,
            models: None,
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// Request sent → response header.
    pub first_byte: Duration,
    /// Longest silence while reading the response body.
    pub idle: Duration,
    /// Whole exchange.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(300),
            total: Duration::from_secs(3600),
        }
    }
}

/// A model clients can ask for.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Name clients use.
    pub name: String,
    /// Upstream name.
    pub upstream: String,
    /// Upstream model id when it differs from `name`.
    pub upstream_model: Option<String>,
    /// `upstream_model` as a JSON string, as request bodies get it (encoded once, at load).
    pub upstream_model_json: Option<String>,
    /// Sampling policy: the upstream's, with the model's rules replacing same-field ones.
    pub sampling: Policy,
    /// Remove injected fields the client did not ask for from responses.
    pub strip_injected_fields: bool,
    /// `stream_options.include_usage` is injected for usage accounting (not by the operator's
    /// policy): the usage chunk is withheld from clients that did not ask for it.
    pub usage_injected: bool,
}

/// A pass-through route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix.
    pub prefix: String,
    /// Upstream name.
    pub upstream: String,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
}

/// Process-level settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Proxy worker threads.
    pub threads: usize,
    /// Work-stealing runtime (off: one independent runtime per thread, cheaper per request).
    pub work_stealing: bool,
    /// PID file.
    pub pid_file: String,
    /// Upgrade socket.
    pub upgrade_sock: String,
    /// Grace period on shutdown.
    pub grace_period: Duration,
}

/// Everything wrong with a config file, each problem with its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// One line per problem: `path: message`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(msg: impl Into<String>) -> Self {
        Self {
            problems: vec![msg.into()],
        }
    }
}

/// Reads and validates a config file, resolving env references from the process environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
    from_yaml_str(&text, &|name| std::env::var(name).ok())
}

/// Parses and validates YAML text; `env` resolves `os.environ/NAME` and `${NAME}`.
pub fn from_yaml_str(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." || inner.starts_with(&format!("{path}:")) {
            // serde_yaml already names the path in some messages.
            ConfigError::one(inner)
        } else {
            ConfigError::one(format!("{path}: {inner}"))
        }
    })?;
    validate(raw, env)
}

/// Turns the raw file into the validated model, collecting every problem.
pub fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();

    let listen = edge::listeners(&raw.listen, &mut problems);
    let trusted_proxies = edge::cidrs("trusted_proxies", &raw.trusted_proxies, &mut problems);
    let auth = edge::auth(raw.auth, env, &mut problems);
    let cors = edge::cors(raw.cors, &mut problems);
    let egress_allow = edge::cidrs("egress.allow_cidrs", &raw.egress.allow_cidrs, &mut problems);
    let dns = edge::dns(raw.dns, &mut problems);
    let admin = edge::admin(raw.admin, env, &mut problems);
    if listen.iter().any(|l| l.addr == admin.listen) {
        problems.push(format!(
            "admin.listen: {} is also a proxy listener",
            admin.listen
        ));
    }
    let access_log = edge::access_log(raw.access_log, &mut problems);
    let mut warnings = Vec::new();

    let max_body = match raw.limits.max_body {
        Some(s) if s.0 == 0 => {
            problems.push("limits.max_body: must be greater than 0".to_string());
            DEFAULT_MAX_BODY
        }
        Some(s) => usize::try_from(s.0).unwrap_or(usize::MAX),
        None => DEFAULT_MAX_BODY,
    };

    let max_slug = match raw.limits.max_slug {
        Some(s) if s.0 == 0 => {
            problems.push("limits.max_slug: must be greater than 0".to_string());
            crate::route::slug::DEFAULT_MAX_SLUG
        }
        Some(s) => usize::try_from(s.0).unwrap_or(usize::MAX),
        None => crate::route::slug::DEFAULT_MAX_SLUG,
    };

    let limits = Limits {
        max_body,
        max_slug,
        max_uri: size_or(
            &raw.limits.max_uri,
            8 << 10,
            "limits.max_uri",
            &mut problems,
        ),
        max_headers: match raw.limits.max_headers {
            Some(0) => {
                problems.push("limits.max_headers: must be at least 1".to_string());
                100
            }
            Some(n) => n,
            None => 100,
        },
        max_header_bytes: size_or(
            &raw.limits.max_header_bytes,
            64 << 10,
            "limits.max_header_bytes",
            &mut problems,
        ),
        body_timeout: raw
            .limits
            .body_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_millis(10)),
        min_body_rate: raw.limits.min_body_rate.map(|s| s.0).unwrap_or(256),
        max_concurrent_requests: raw.limits.max_concurrent_requests.unwrap_or(0),
    };

    let mut upstreams = BTreeMap::new();
    for (name, u) in raw.upstreams {
        for e in &u.endpoints {
            if let Some(why) = parse_endpoint(e)
                .ok()
                .and_then(|ep| ep.literal_ip)
                .and_then(crate::upstream::egress::literal_warning)
            {
                warnings.push(format!("upstreams.{name}.endpoints: {e}: {why}"));
            }
        }
        if let Some(up) = validate_upstream(&name, u, env, &mut problems) {
            upstreams.insert(name, up);
        }
    }

    let mut models = Vec::new();
    let mut seen = HashSet::new();
    for (i, m) in raw.models.into_iter().enumerate() {
        if m.name.is_empty() {
            problems.push(format!("models[{i}].name: must not be empty"));
        }
        if !seen.insert(m.name.clone()) {
            problems.push(format!("models[{i}].name: duplicate model {:?}", m.name));
        }
        if !upstreams.contains_key(&m.upstream) {
            problems.push(format!(
                "models[{i}].upstream: unknown upstream {:?}",
                m.upstream
            ));
        }
        let upstream_model = m.model.filter(|um| um != &m.name);
        let mut sampling = Policy::default();
        if let Some(up) = upstreams.get(&m.upstream) {
            let own = validate_sampling(
                &format!("models[{i}].sampling"),
                m.sampling.unwrap_or_default(),
                up.kind,
                &mut problems,
            );
            sampling = up.sampling.merged_with(&own);
        }
        models.push(ModelConfig {
            name: m.name,
            upstream: m.upstream,
            upstream_model_json: upstream_model
                .as_deref()
                .and_then(|um| String::from_utf8(crate::shaping::body::json_string(um)).ok()),
            upstream_model,
            sampling,
            strip_injected_fields: m.strip_injected_fields,
            usage_injected: false,
        });
    }

    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        if !r.prefix.starts_with('/') {
            problems.push(format!("routes[{i}].prefix: must start with '/'"));
        }
        if !upstreams.contains_key(&r.upstream) {
            problems.push(format!(
                "routes[{i}].upstream: unknown upstream {:?}",
                r.upstream
            ));
        }
        routes.push(RouteConfig {
            prefix: r.prefix,
            upstream: r.upstream,
            strip_prefix: r.strip_prefix,
        });
    }

    let threads = raw.server.threads.unwrap_or(1).max(1);
    let server = ServerSettings {
        threads,
        // With one thread there is nothing to steal from, and the work-stealing scheduler
        // costs about 4 µs per request more than a single-threaded one (benches/e2e, S1).
        work_stealing: raw.server.work_stealing.unwrap_or(threads > 1),
        pid_file: raw
            .server
            .pid_file
            .unwrap_or_else(|| "/tmp/llm-edge.pid".to_string()),
        upgrade_sock: raw
            .server
            .upgrade_sock
            .unwrap_or_else(|| "/tmp/llm-edge-upgrade.sock".to_string()),
        grace_period: raw
            .shutdown
            .grace_period
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30)),
    };

    let demo_upstream = match raw.demo_upstream {
        Some(d) => match d.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "demo_upstream.listen: {:?} is not an IP:port address",
                    d.listen
                ));
                None
            }
        },
        None => None,
    };

    let mut tracing = TraceSettings::default();
    if let Some(t) = raw.tracing {
        tracing.mode = t.mode.unwrap_or(TraceMode::WhenMetadata);
        tracing.sqlite = t.sqlite.map(PathBuf::from);
        tracing.jsonl = t.jsonl.map(PathBuf::from);
        if let Some(s) = t.jsonl_max_size {
            tracing.jsonl_max_size = s.0.max(1);
        }
        if let Some(k) = t.jsonl_keep {
            tracing.jsonl_keep = k.max(1);
        }
        if let Some(q) = t.queue {
            if q == 0 {
                problems.push("tracing.queue: must be at least 1".to_string());
            }
            tracing.queue = q.max(1);
        }
        if let Some(url) = t.collector {
            match parse_endpoint(&url) {
                Ok(_) => tracing.collector = Some(url),
                Err(why) => problems.push(format!("tracing.collector: {why}")),
            }
        }
        if tracing.mode != TraceMode::Never
            && tracing.sqlite.is_none()
            && tracing.jsonl.is_none()
            && tracing.collector.is_none()
        {
            problems.push(
                "tracing: set sqlite, jsonl and/or collector (or mode: never): traces need somewhere to go"
                    .to_string(),
            );
        }
    }

    // Tokens-per-minute limits are charged from observed usage, so they need it as much as the
    // ledger does (`usage.inject_include_usage: false` still turns the injection off).
    let tpm_limits = auth.keys.iter().any(|k| k.rate_limit.tpm.is_some());
    let inject_usage = match raw.usage.as_ref() {
        Some(u) => u.inject_include_usage.unwrap_or(true),
        None => tpm_limits,
    };
    if inject_usage {
        // Streams only report usage when asked: ask, unless the policy says otherwise.
        let field = FieldPath {
            top: "stream_options".into(),
            sub: Some("include_usage".into()),
        };
        for m in models.iter_mut() {
            let kind = upstreams.get(&m.upstream).map(|u| u.kind);
            let has_rule = m.sampling.rules.iter().any(|(f, _)| *f == field);
            if matches!(kind, Some(UpstreamKind::Openai | UpstreamKind::Vllm)) && !has_rule {
                m.sampling.rules.push((
                    field.clone(),
                    Action::SetIfAbsent(serde_json::Value::Bool(true)),
                ));
                m.usage_injected = true;
            }
        }
    }
    let usage = raw.usage.map(|u| UsageSettings {
        ledger: u.ledger.map(PathBuf::from),
        flush_interval: u
            .flush_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(10)),
    });
    if let Some(p) = usage.as_ref().and_then(|u| u.ledger.as_ref()) {
        if p.extension().is_some_and(|e| e == "db") {
            problems.push(
                "usage.ledger: only a JSON ledger file is supported (use a .json path)".to_string(),
            );
        }
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    if auth.open {
        warnings.push(
            "auth: mode open: every client may call every model (no client keys)".to_string(),
        );
    }
    Ok(Config {
        tracing,
        usage,
        listen,
        trusted_proxies,
        auth,
        cors,
        egress_allow,
        dns,
        admin,
        access_log,
        warnings,
        limits,
        upstreams,
        models,
        routes,
        server,
        demo_upstream,
    })
}

fn validate_upstream(
    name: &str,
    u: RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<UpstreamConfig> {
    let before = problems.len();
    let at = format!("upstreams.{name}");
    if u.endpoints.is_empty() {
        problems.push(format!("{at}.endpoints: at least one endpoint is required"));
    }
    let mut endpoints = Vec::new();
    for (i, e) in u.endpoints.iter().enumerate() {
        match parse_endpoint(e) {
            Ok(ep) => endpoints.push(ep),
            Err(why) => problems.push(format!("{at}.endpoints[{i}]: {why}")),
        }
    }
    let mut keys = Vec::new();
    let mut ids = HashSet::new();
    for (i, k) in u.keys.into_iter().enumerate() {
        let (id, raw_secret, weight, max_concurrent, models) = match k {
            RawKey::Bare(s) => (None, s, None, None, None),
            RawKey::Full(f) => (f.id, f.key, f.weight, f.max_concurrent, f.models),
        };
        if weight == Some(0) {
            problems.push(format!("{at}.keys[{i}].weight: must be at least 1"));
        }
        if max_concurrent == Some(0) {
            problems.push(format!("{at}.keys[{i}].max_concurrent: must be at least 1"));
        }
        let secret = match secret::resolve(&raw_secret, env) {
            Ok(s) if s.is_empty() => {
                problems.push(format!("{at}.keys[{i}]: the key is empty"));
                continue;
            }
            Ok(s) => s,
            Err(why) => {
                problems.push(format!("{at}.keys[{i}]: {why}"));
                continue;
            }
        };
        if secret.bytes().any(|b| b < 0x20 || b == 0x7f) {
            problems.push(format!(
                "{at}.keys[{i}]: the key contains control characters"
            ));
            continue;
        }
        let id = id.unwrap_or_else(|| derived_key_id(&secret));
        if !ids.insert(id.clone()) {
            problems.push(format!("{at}.keys[{i}].id: duplicate key id {id:?}"));
        }
        keys.push(UpstreamKey {
            id,
            secret: Secret::new(secret),
            weight: weight.unwrap_or(1).max(1),
            max_concurrent,
            models,
        });
    }
    let d = Timeouts::default();
    let timeouts = Timeouts {
        connect: u.timeouts.connect.map(|t| t.0).unwrap_or(d.connect),
        first_byte: u.timeouts.first_byte.map(|t| t.0).unwrap_or(d.first_byte),
        idle: u.timeouts.idle.map(|t| t.0).unwrap_or(d.idle),
        total: u.timeouts.total.map(|t| t.0).unwrap_or(d.total),
    };
    for (field, v) in [
        ("connect", timeouts.connect),
        ("first_byte", timeouts.first_byte),
        ("idle", timeouts.idle),
        ("total", timeouts.total),
    ] {
        if v.is_zero() {
            problems.push(format!("{at}.timeouts.{field}: must be greater than 0"));
        }
    }
    let sampling = validate_sampling(
        &format!("{at}.sampling"),
        u.sampling.unwrap_or_default(),
        u.kind,
        problems,
    );
    let health_check = u.health_check.map(|h| {
        if !h.path.starts_with('/') {
            problems.push(format!("{at}.health_check.path: must start with '/'"));
        }
        let interval = h.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5));
        if interval < Duration::from_millis(10) {
            problems.push(format!("{at}.health_check.interval: at least 10ms"));
        }
        HealthCheck {
            path: h.path,
            interval,
            timeout: h.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(2)),
            unhealthy_after: h.unhealthy_after.unwrap_or(2).max(1),
            healthy_after: h.healthy_after.unwrap_or(2).max(1),
        }
    });
    let dp = PassiveHealth::default();
    let passive = PassiveHealth {
        failures: u.passive_health.failures.unwrap_or(dp.failures).max(1),
        eject_for: u
            .passive_health
            .eject_for
            .map(|d| d.0)
            .unwrap_or(dp.eject_for),
    };
    let max_attempts = u.retries.max_attempts.unwrap_or(3);
    if max_attempts == 0 {
        problems.push(format!("{at}.retries.max_attempts: must be at least 1"));
    }
    if problems.len() > before {
        return None;
    }
    let session_header = match u.session_header {
        Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(format!("{at}.session_header: {h:?} is not a header name"));
                return None;
            }
        },
        None => None,
    };
    Some(UpstreamConfig {
        name: name.to_string(),
        kind: u.kind,
        endpoints,
        keys,
        timeouts,
        max_attempts,
        retry_deadline: u
            .retries
            .deadline
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        max_cooldown: u
            .retries
            .max_cooldown
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(300)),
        key_strategy: u.key_strategy,
        session_header,
        max_h2_streams: u.max_h2_streams.unwrap_or(100).max(1),
        verify_tls: u.tls.verify.unwrap_or(true),
        sni: u.tls.sni,
        dns_refresh: u
            .dns_refresh
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_secs(1)),
        sampling,
        forward_metadata: u.forward_metadata == Some(ForwardMetadata::Body),
        allow_private: u.allow_private,
        health_check,
        passive,
    })
}

fn size_or(
    v: &Option<units::HumanSize>,
    default: usize,
    at: &str,
    problems: &mut Vec<String>,
) -> usize {
    match v {
        Some(s) if s.0 == 0 => {
            problems.push(format!("{at}: must be greater than 0"));
            default
        }
        Some(s) => usize::try_from(s.0).unwrap_or(usize::MAX),
        None => default,
    }
}

/// Checks field names and that the upstream kind accepts what is injected.
fn validate_sampling(
    at: &str,
    raw: RawSampling,
    kind: UpstreamKind,
    problems: &mut Vec<String>,
) -> Policy {
    let mut rules: Vec<(FieldPath, Action)> = Vec::new();
    let mut add = |section: &str, name: &str, action: Action, problems: &mut Vec<String>| {
        let field = match FieldPath::parse(name) {
            Ok(f) => f,
            Err(why) => {
                problems.push(format!("{at}.{section}.{name}: {why}"));
                return;
            }
        };
        if field.top == "model" || field.top == "messages" {
            problems.push(format!(
                "{at}.{section}.{name}: the policy cannot change {}",
                field.top
            ));
            return;
        }
        if !matches!(action, Action::Drop) {
            if let Err(why) = kind_accepts(kind, &field) {
                problems.push(format!(
                    "{at}.{section}.{name}: {why} (upstream kind {})",
                    kind.as_str()
                ));
                return;
            }
        }
        if rules.iter().any(|(f, _)| f == &field) {
            problems.push(format!(
                "{at}.{section}.{name}: field appears in more than one section"
            ));
            return;
        }
        rules.push((field, action));
    };
    for (name, v) in raw.set_if_absent {
        add("set_if_absent", &name, Action::SetIfAbsent(v), problems);
    }
    for (name, v) in raw.override_ {
        add("override", &name, Action::Override(v), problems);
    }
    for name in raw.drop {
        add("drop", &name, Action::Drop, problems);
    }
    Policy { rules }
}

/// A key id derived from the secret: `key-` and 8 hex digits of its SHA-256.
pub fn derived_key_id(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// Parses `http(s)://host[:port][/base]`.
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(format!("scheme {other:?} is not http or https")),
        None => return Err(format!("{url:?} has no scheme (use http:// or https://)")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not supported; use keys:".to_string());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if uri.query().is_some() {
        return Err("a query string is not allowed in an endpoint".to_string());
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    let literal_ip = if host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        host.parse::<IpAddr>().ok()
    };
    Ok(Endpoint {
        url: url.to_string(),
        tls,
        host,
        port,
        authority: authority.as_str().to_string(),
        base_path,
        literal_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test configs without an `auth:` section run in open mode.
    fn open_yaml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        if text.contains("\nauth:") {
            from_yaml_str(text, env)
        } else {
            from_yaml_str(&format!("auth: {{mode: open}}\n{text}"), env)
        }
    }

    fn env(name: &str) -> Option<String> {
        (name == "VLLM_KEY").then(|| "vllm-secret-token-0001".to_string())
    }

    const ISSUE_FORM: &str = r#"
listen: ["127.0.0.1:8080"]
auth: {mode: open}
upstreams:
  local-vllm:
    kind: vllm
    endpoints: ["http://127.0.0.1:8000"]
    keys: [os.environ/VLLM_KEY]
models:
  - name: qwen
    upstream: local-vllm
    model: Qwen/Qwen2.5-7B-Instruct
routes:
  - prefix: /raw/
    upstream: local-vllm
    strip_prefix: true
"#;

    #[test]
    fn issue_form_loads() {
        let c = open_yaml(ISSUE_FORM, &env).unwrap();
        assert_eq!(c.listen[0].addr, "127.0.0.1:8080".parse().unwrap());
        let u = &c.upstreams["local-vllm"];
        assert_eq!(u.kind, UpstreamKind::Vllm);
        assert_eq!(u.endpoints[0].port, 8000);
        assert_eq!(u.keys[0].secret.expose(), "vllm-secret-token-0001");
        assert!(u.keys[0].id.starts_with("key-"));
        assert_eq!(
            c.models[0].upstream_model.as_deref(),
            Some("Qwen/Qwen2.5-7B-Instruct")
        );
        assert!(c.routes[0].strip_prefix);
        assert_eq!(c.limits.max_body, DEFAULT_MAX_BODY);
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = ISSUE_FORM.replace("strip_prefix: true", "strip_prefix: true\n    colour: red");
        let e = open_yaml(&text, &env).unwrap_err().to_string();
        assert!(e.contains("routes[0]"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let e = open_yaml(ISSUE_FORM, &|_| None).unwrap_err().to_string();
        assert!(e.contains("upstreams.local-vllm.keys[0]"), "{e}");
        assert!(e.contains("VLLM_KEY"), "{e}");
    }

    #[test]
    fn bad_references_are_all_reported() {
        let text = r#"
upstreams:
  a: {kind: openai, endpoints: ["ftp://x"]}
models:
  - {name: m, upstream: nope}
routes:
  - {prefix: raw, upstream: nope}
"#;
        let e = open_yaml(text, &env).unwrap_err();
        let all = e.to_string();
        assert!(all.contains("upstreams.a.endpoints[0]"), "{all}");
        assert!(all.contains("models[0].upstream"), "{all}");
        assert!(all.contains("routes[0].prefix"), "{all}");
        assert!(all.contains("routes[0].upstream"), "{all}");
    }

    #[test]
    fn sampling_is_merged_and_checked_against_the_kind() {
        let text = r#"
upstreams:
  v: {kind: vllm, endpoints: ["http://127.0.0.1:1"], sampling: {set_if_absent: {logprobs: true, temperature: 0.7}}}
  o: {kind: openai, endpoints: ["https://127.0.0.1:1"]}
models:
  - name: q
    upstream: v
    sampling:
      set_if_absent: {logprobs: true, return_token_ids: true}
      override: {"stream_options.include_usage": true}
      drop: [temperature]
"#;
        let c = open_yaml(text, &env).unwrap();
        let rules = &c.models[0].sampling.rules;
        assert_eq!(rules.len(), 4, "{rules:?}");
        assert!(rules
            .iter()
            .any(|(f, a)| f.top == "temperature" && *a == Action::Drop));
        let bad = text.replace("upstream: v", "upstream: o");
        let e = open_yaml(&bad, &env).unwrap_err().to_string();
        assert!(
            e.contains("models[0].sampling.set_if_absent.return_token_ids"),
            "{e}"
        );
        let anth = r#"
upstreams:
  a: {kind: anthropic, endpoints: ["https://127.0.0.1:1"], sampling: {set_if_absent: {logprobs: true}}}
"#;
        let e = open_yaml(anth, &env).unwrap_err().to_string();
        assert!(
            e.contains("upstreams.a.sampling.set_if_absent.logprobs"),
            "{e}"
        );
    }

    #[test]
    fn endpoints_parse() {
        let e = parse_endpoint("https://api.openai.com").unwrap();
        assert!(e.tls);
        assert_eq!(e.port, 443);
        assert_eq!(e.literal_ip, None);
        let e = parse_endpoint("http://[::1]:9000/base/").unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.base_path, "/base");
        assert_eq!(e.authority, "[::1]:9000");
        assert!(e.literal_ip.is_some());
        assert!(parse_endpoint("http://user:pw@host").is_err());
        assert!(parse_endpoint("localhost:80").is_err());
    }

    #[test]
    fn tpm_limits_ask_streams_for_usage() {
        let text = |tpm: &str| {
            format!(
                "auth: {{keys: [{{id: a, key: client-key-1, rate_limit: {{{tpm}}}}}]}}\nupstreams: {{v: {{kind: vllm, endpoints: ['http://127.0.0.1:1']}}}}\nmodels: [{{name: q, upstream: v}}]\n"
            )
        };
        let with = from_yaml_str(&text("tpm: 1000"), &env).unwrap();
        assert!(
            with.models[0].usage_injected,
            "a TPM limit needs stream usage"
        );
        let without = from_yaml_str(&text("rpm: 10"), &env).unwrap();
        assert!(!without.models[0].usage_injected);
    }
}
