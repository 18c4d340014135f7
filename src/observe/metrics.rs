//! Prometheus metrics, `llm_edge_` prefix.
//!
//! Every [`Metrics`] owns its own registry so several proxies in one process (the end-to-end
//! tests) count alone; [`Metrics::render`] appends the default registry, where Pingora and
//! other libraries register theirs.
//!
//! Label values must stay bounded: pass configured names only (routes, models, upstreams, key
//! ids, client ids) and `-` for anything unknown. Never a request id, a raw path or a model
//! name a client made up — each distinct value is a new series kept until the process exits.
//!
//! The recording methods are called from request hooks: a label lookup (the families every
//! call records into keep each thread's series, [`super::series`]; the others look up under a
//! read lock) and an atomic add, no allocation once a series exists, no I/O.

use super::series::CachedVec;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Latency buckets (seconds) for whole requests and upstream exchanges: 1 ms to 10 min, since
/// a cached embedding and a long reasoning stream share the same families.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Buckets (seconds) for llm-edge's own time: 25 µs to 1 s, fine at the low end where a
/// healthy proxy lives.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];

/// Which path a request took (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// An API call forwarded by llm-edge's own forwarder.
    Api,
    /// A request proxied through Pingora's pass-through path.
    Passthrough,
    /// A `/v1/models` listing.
    Models,
    /// Answered by llm-edge itself (CORS preflight, an error before routing, ...).
    Local,
}

impl RequestKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Passthrough => "passthrough",
            Self::Models => "models",
            Self::Local => "local",
        }
    }
}

/// Why a retry (another attempt) or a failover (another attempt on a different replica) happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// 429 from the upstream.
    RateLimited,
    /// 401/403 from the upstream (a bad or revoked key).
    Auth,
    /// 5xx from the upstream.
    ServerError,
    /// The connection could not be made.
    ConnectError,
    /// The upstream did not answer in time.
    Timeout,
    /// Anything else.
    Other,
}

impl RetryReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Auth => "auth",
            Self::ServerError => "server_error",
            Self::ConnectError => "connect_error",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }
}

/// Why llm-edge refused a request itself (the `reason` label of `llm_edge_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Missing or wrong client credentials.
    Auth,
    /// The client key may not use the model.
    ForbiddenModel,
    /// Client rate limit hit.
    RateLimit,
    /// Request body over `limits.max_body`.
    BodyTooLarge,
    /// Request headers too large.
    HeadersTooLarge,
    /// Request URI too long.
    UriTooLong,
    /// The client was too slow to send its request.
    RequestTimeout,
    /// Shed under load.
    Overloaded,
    /// The egress policy refused the upstream address.
    Egress,
    /// A CORS request from an origin not allowed.
    Cors,
    /// Malformed request (bad JSON, bad slug, ...).
    BadRequest,
}

impl RejectReason {
    /// Every reason, so each series exists (at 0) from start-up.
    pub const ALL: [RejectReason; 11] = [
        Self::Auth,
        Self::ForbiddenModel,
        Self::RateLimit,
        Self::BodyTooLarge,
        Self::HeadersTooLarge,
        Self::UriTooLong,
        Self::RequestTimeout,
        Self::Overloaded,
        Self::Egress,
        Self::Cors,
        Self::BadRequest,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::ForbiddenModel => "forbidden_model",
            Self::RateLimit => "rate_limit",
            Self::BodyTooLarge => "body_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::RequestTimeout => "request_timeout",
            Self::Overloaded => "overloaded",
            Self::Egress => "egress",
            Self::Cors => "cors",
            Self::BadRequest => "bad_request",
        }
    }
}

/// State of one upstream key (the `state` label of `llm_edge_key_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyStateLabel {
    /// Usable.
    Up,
    /// Resting after a 429 or an error, usable again later.
    Cooling,
    /// Disabled (revoked, or failing auth).
    Dead,
}

impl KeyStateLabel {
    /// Every state; one series each per key.
    pub const ALL: [KeyStateLabel; 3] = [Self::Up, Self::Cooling, Self::Dead];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Cooling => "cooling",
            Self::Dead => "dead",
        }
    }
}

/// The `status_class` label of a status code: `1xx` … `5xx`, `other` outside 100..=599.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Holds a gauge one higher while alive; dropping it (also when a request future is
/// cancelled) takes it back down.
#[must_use = "the gauge goes back down as soon as the guard is dropped"]
#[derive(Debug)]
pub struct ActiveGuard {
    gauge: IntGauge,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// All llm-edge metric families, on a registry of their own.
pub struct Metrics {
    registry: Registry,
    requests: CachedVec<IntCounterVec>,
    request_duration: CachedVec<HistogramVec>,
    upstream_duration: CachedVec<HistogramVec>,
    upstream_ttfb: CachedVec<HistogramVec>,
    proxy_overhead: CachedVec<HistogramVec>,
    active_requests: IntGauge,
    active_streams: IntGauge,
    tokens: CachedVec<IntCounterVec>,
    retries: IntCounterVec,
    failovers: IntCounterVec,
    key_state: IntGaugeVec,
    rejected: IntCounterVec,
    egress_refused: IntCounterVec,
    trace_queue_depth: IntGauge,
    trace_dropped: IntCounter,
    trace_dropped_seen: AtomicU64,
    ledger_pending: IntGauge,
    access_log_dropped: IntCounter,
    access_log_dropped_seen: AtomicU64,
    replica_healthy: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_last_reload: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers `metric` on `registry`.
///
/// Start-up invariant: names, help texts, label names and buckets are constants of this file
/// and every family is registered once on a fresh registry, so neither building nor
/// registering can fail; a failure is a bug caught by the first test run.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.expect("metric definition is valid (constant)");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric family registered once on a fresh registry");
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ),
    )
}

/// Seconds since the Unix epoch, 0 for a clock before it.
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds the growth of a component's running total since the last sync. `fetch_max` makes
/// concurrent syncs add up to exactly the growth, and a stale (lower) reading add nothing.
fn sync_counter(counter: &IntCounter, seen: &AtomicU64, total: u64) {
    let before = seen.fetch_max(total, Ordering::AcqRel);
    if total > before {
        counter.inc_by(total - before);
    }
}

// A label-count mismatch is a bug in this file; metrics must never take the proxy down for
// it, so the series is skipped instead of panicking as `with_label_values` would.
fn counter(vec: &IntCounterVec, labels: &[&str]) -> Option<IntCounter> {
    vec.get_metric_with_label_values(labels).ok()
}

fn gauge(vec: &IntGaugeVec, labels: &[&str]) -> Option<IntGauge> {
    vec.get_metric_with_label_values(labels).ok()
}

fn observe(vec: &CachedVec<HistogramVec>, labels: &[&str], d: Duration) {
    vec.with(labels, |h| h.observe(d.as_secs_f64()));
}

impl Metrics {
    /// A fresh set of families on a registry of its own, with `llm_edge_build_info` set and
    /// the fixed-label series (`rejected_total` reasons, reload results) present at 0.
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let m = Metrics {
            requests: CachedVec::new(counter_vec(
                &r,
                "llm_edge_requests_total",
                "Requests answered, by path kind, configured model, upstream and status class.",
                &["kind", "model", "upstream", "status_class"],
            )),
            request_duration: CachedVec::new(histogram_vec(
                &r,
                "llm_edge_request_duration_seconds",
                "Whole request time as the client sees it, from request start to last byte sent.",
                &["kind", "upstream"],
                LATENCY_BUCKETS,
            )),
            upstream_duration: CachedVec::new(histogram_vec(
                &r,
                "llm_edge_upstream_duration_seconds",
                "Upstream exchange time, from request sent to last response byte received.",
                &["upstream"],
                LATENCY_BUCKETS,
            )),
            upstream_ttfb: CachedVec::new(histogram_vec(
                &r,
                "llm_edge_upstream_ttfb_seconds",
                "Upstream time to first byte, from request sent to response header received.",
                &["upstream"],
                LATENCY_BUCKETS,
            )),
            proxy_overhead: CachedVec::new(histogram_vec(
                &r,
                "llm_edge_proxy_overhead_seconds",
                "Time spent in llm-edge itself, excluding the wait for the upstream.",
                &["kind"],
                OVERHEAD_BUCKETS,
            )),
            active_requests: register(
                &r,
                IntGauge::new("llm_edge_active_requests", "Requests in flight."),
            ),
            active_streams: register(
                &r,
                IntGauge::new(
                    "llm_edge_active_streams",
                    "Streamed responses being relayed to clients.",
                ),
            ),
            tokens: CachedVec::new(counter_vec(
                &r,
                "llm_edge_tokens_total",
                "Tokens reported by upstreams; direction in = prompt, out = completion.",
                &["direction", "model", "upstream", "key_id", "client"],
            )),
            retries: counter_vec(
                &r,
                "llm_edge_upstream_retries_total",
                "Extra attempts of a call after a failed one (any key or replica), by cause.",
                &["upstream", "reason"],
            ),
            failovers: counter_vec(
                &r,
                "llm_edge_upstream_failovers_total",
                "Extra attempts that moved to a different replica than the failed one, by cause.",
                &["upstream", "reason"],
            ),
            key_state: gauge_vec(
                &r,
                "llm_edge_key_state",
                "Upstream key state: 1 for the key's current state, 0 for the others.",
                &["upstream", "key_id", "state"],
            ),
            rejected: counter_vec(
                &r,
                "llm_edge_rejected_total",
                "Requests refused by llm-edge itself, by reason.",
                &["reason"],
            ),
            egress_refused: counter_vec(
                &r,
                "llm_edge_egress_refused_total",
                "Upstream addresses refused by the egress policy, by address class.",
                &["upstream", "class"],
            ),
            trace_queue_depth: register(
                &r,
                IntGauge::new(
                    "llm_edge_trace_queue_depth",
                    "Trace records queued for the trace writer.",
                ),
            ),
            trace_dropped: register(
                &r,
                IntCounter::new(
                    "llm_edge_trace_dropped_total",
                    "Trace records dropped because the trace queue was full.",
                ),
            ),
            trace_dropped_seen: AtomicU64::new(0),
            ledger_pending: register(
                &r,
                IntGauge::new(
                    "llm_edge_ledger_pending",
                    "Usage ledger changes not yet saved to disk.",
                ),
            ),
            access_log_dropped: register(
                &r,
                IntCounter::new(
                    "llm_edge_access_log_dropped_total",
                    "Access log lines lost: queue full or write failed.",
                ),
            ),
            access_log_dropped_seen: AtomicU64::new(0),
            replica_healthy: gauge_vec(
                &r,
                "llm_edge_replica_healthy",
                "Upstream replica health: 1 healthy, 0 not.",
                &["upstream", "replica"],
            ),
            config_reloads: counter_vec(
                &r,
                "llm_edge_config_reloads_total",
                "Configuration reloads, by result (ok or error).",
                &["result"],
            ),
            config_last_reload: register(
                &r,
                Gauge::new(
                    "llm_edge_config_last_reload_timestamp_seconds",
                    "Unix time of the last successful configuration load.",
                ),
            ),
            registry: r,
        };
        let build = gauge_vec(
            &m.registry,
            "llm_edge_build_info",
            "Always 1; the version label is the llm-edge version.",
            &["version"],
        );
        if let Some(g) = gauge(&build, &[env!("CARGO_PKG_VERSION")]) {
            g.set(1);
        }
        // Series that exist from the start, so `rate()` and alerts see a 0 rather than nothing.
        for reason in RejectReason::ALL {
            let _ = counter(&m.rejected, &[reason.as_str()]);
        }
        for result in ["ok", "error"] {
            let _ = counter(&m.config_reloads, &[result]);
        }
        Arc::new(m)
    }

    /// This instance's registry (for registering extra collectors next to ours).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition: this registry's families, then the default registry's (Pingora's),
    /// minus any family whose name this registry already has. Called per scrape, not per
    /// request.
    pub fn render(&self) -> Vec<u8> {
        let ours = self.registry.gather();
        let global = prometheus::gather();
        let encoder = TextEncoder::new();
        let mut out = Vec::with_capacity(32 << 10);
        // `gather` returns families sorted by name, so a binary search finds duplicates.
        let is_ours = |name: &str| ours.binary_search_by(|mf| mf.name().cmp(name)).is_ok();
        let families = ours
            .iter()
            .chain(global.iter().filter(|mf| !is_ours(mf.name())));
        for mf in families {
            // One family at a time, so a malformed foreign family costs only itself.
            if let Err(e) = encoder.encode(std::slice::from_ref(mf), &mut out) {
                tracing::warn!("metrics: skipping family {}: {e}", mf.name());
            }
        }
        out
    }

    /// `llm_edge_active_requests` one higher until the guard is dropped.
    pub fn request_guard(&self) -> ActiveGuard {
        self.active_requests.inc();
        ActiveGuard {
            gauge: self.active_requests.clone(),
        }
    }

    /// `llm_edge_active_streams` one higher until the guard is dropped.
    pub fn stream_guard(&self) -> ActiveGuard {
        self.active_streams.inc();
        ActiveGuard {
            gauge: self.active_streams.clone(),
        }
    }

    /// Counts a finished request and observes its duration as the client saw it.
    ///
    /// `model`: the configured model name, `-` when unknown or not configured (never a name
    /// the client sent that is not in the config). `upstream`: the configured upstream name,
    /// `-` when none was chosen (local answers, errors before routing).
    pub fn record_request(
        &self,
        kind: RequestKind,
        model: &str,
        upstream: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let kind = kind.as_str();
        self.requests
            .with(&[kind, model, upstream, status_class(status)], |c| c.inc());
        observe(&self.request_duration, &[kind, upstream], elapsed);
    }

    /// Observes one upstream exchange, request sent → last response byte. `upstream`: the
    /// configured name.
    pub fn observe_upstream_duration(&self, upstream: &str, elapsed: Duration) {
        observe(&self.upstream_duration, &[upstream], elapsed);
    }

    /// Observes an upstream's time to first byte, request sent → response header.
    /// `upstream`: the configured name.
    pub fn observe_upstream_ttfb(&self, upstream: &str, elapsed: Duration) {
        observe(&self.upstream_ttfb, &[upstream], elapsed);
    }

    /// Observes the time llm-edge spent on a request outside the upstream wait.
    pub fn observe_overhead(&self, kind: RequestKind, elapsed: Duration) {
        observe(&self.proxy_overhead, &[kind.as_str()], elapsed);
    }

    /// Adds the tokens of one call. `model`, `upstream`: configured names (`-` if unknown);
    /// `key_id`: the upstream key id (`-` for keyless upstreams); `client`: the client key id,
    /// or `anonymous`.
    pub fn add_tokens(
        &self,
        model: &str,
        upstream: &str,
        key_id: &str,
        client: &str,
        tokens_in: u64,
        tokens_out: u64,
    ) {
        for (direction, n) in [("in", tokens_in), ("out", tokens_out)] {
            if n == 0 {
                continue;
            }
            self.tokens
                .with(&[direction, model, upstream, key_id, client], |c| {
                    c.inc_by(n)
                });
        }
    }

    /// Counts a retry on the same upstream. `upstream`: the configured name.
    pub fn count_retry(&self, upstream: &str, reason: RetryReason) {
        if let Some(c) = counter(&self.retries, &[upstream, reason.as_str()]) {
            c.inc();
        }
    }

    /// Counts an attempt that moved to a different replica of `upstream`.
    pub fn count_failover(&self, upstream: &str, reason: RetryReason) {
        if let Some(c) = counter(&self.failovers, &[upstream, reason.as_str()]) {
            c.inc();
        }
    }

    /// Counts a request llm-edge refused itself.
    pub fn count_rejected(&self, reason: RejectReason) {
        if let Some(c) = counter(&self.rejected, &[reason.as_str()]) {
            c.inc();
        }
    }

    /// Counts an upstream address refused by the egress policy. `upstream`: the configured
    /// name; `class`: the egress policy's address class (a fixed vocabulary such as
    /// `loopback`, `private`, `link_local`), never the address itself.
    pub fn count_egress_refused(&self, upstream: &str, class: &str) {
        if let Some(c) = counter(&self.egress_refused, &[upstream, class]) {
            c.inc();
        }
    }

    /// Sets a key's state series: 1 for `state`, 0 for the other two. Called at scrape time
    /// for every configured key. `upstream`, `key_id`: configured names.
    pub fn set_key_state(&self, upstream: &str, key_id: &str, state: KeyStateLabel) {
        for s in KeyStateLabel::ALL {
            if let Some(g) = gauge(&self.key_state, &[upstream, key_id, s.as_str()]) {
                g.set(i64::from(s == state));
            }
        }
    }

    /// Forgets every key state series, so keys removed by a config reload disappear; set the
    /// current keys again right after (before rendering).
    pub fn reset_key_states(&self) {
        self.key_state.reset();
    }

    /// Sets a replica's health. `upstream`: the configured name; `replica`: its configured or
    /// discovered address.
    pub fn set_replica_healthy(&self, upstream: &str, replica: &str, healthy: bool) {
        if let Some(g) = gauge(&self.replica_healthy, &[upstream, replica]) {
            g.set(i64::from(healthy));
        }
    }

    /// Forgets every replica health series (replicas gone after a reload or re-discovery);
    /// set the current replicas again right after.
    pub fn reset_replica_health(&self) {
        self.replica_healthy.reset();
    }

    /// Sets `llm_edge_trace_queue_depth` from the trace writer's queue length.
    pub fn set_trace_queue_depth(&self, depth: u64) {
        self.trace_queue_depth.set(gauge_value(depth));
    }

    /// Brings `llm_edge_trace_dropped_total` up to the trace writer's running total of drops.
    /// The total must be process-wide and never reset; a lower value than last time is
    /// ignored (the counter never decreases).
    pub fn sync_trace_dropped(&self, total: u64) {
        sync_counter(&self.trace_dropped, &self.trace_dropped_seen, total);
    }

    /// Sets `llm_edge_ledger_pending` from the ledger's count of unsaved changes.
    pub fn set_ledger_pending(&self, pending: u64) {
        self.ledger_pending.set(gauge_value(pending));
    }

    /// Brings `llm_edge_access_log_dropped_total` up to the access log's running total
    /// ([`crate::observe::access_log::AccessLog::dropped`]). Same rules as
    /// [`Metrics::sync_trace_dropped`].
    pub fn sync_access_log_dropped(&self, total: u64) {
        sync_counter(
            &self.access_log_dropped,
            &self.access_log_dropped_seen,
            total,
        );
    }

    /// Counts a configuration reload; a successful one also sets
    /// `llm_edge_config_last_reload_timestamp_seconds` to now.
    pub fn record_config_reload(&self, ok: bool) {
        if let Some(c) = counter(&self.config_reloads, &[if ok { "ok" } else { "error" }]) {
            c.inc();
        }
        if ok {
            self.mark_config_loaded(SystemTime::now());
        }
    }

    /// Sets `llm_edge_config_last_reload_timestamp_seconds` without counting a reload (the
    /// configuration loaded at start-up).
    pub fn mark_config_loaded(&self, at: SystemTime) {
        self.config_last_reload.set(unix_seconds(at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    /// Touches every family once; the guards keep the active gauges at 1.
    fn touch_all(m: &Metrics) -> (ActiveGuard, ActiveGuard) {
        m.record_request(
            RequestKind::Api,
            "gpt",
            "openai",
            200,
            Duration::from_millis(30),
        );
        m.observe_upstream_duration("openai", Duration::from_millis(25));
        m.observe_upstream_ttfb("openai", Duration::from_millis(5));
        m.observe_overhead(RequestKind::Api, Duration::from_micros(80));
        let guards = (m.request_guard(), m.stream_guard());
        m.add_tokens("gpt", "openai", "k1", "anonymous", 10, 20);
        m.count_retry("openai", RetryReason::RateLimited);
        m.count_failover("openai", RetryReason::ServerError);
        m.set_key_state("openai", "k1", KeyStateLabel::Up);
        m.count_rejected(RejectReason::Auth);
        m.count_egress_refused("openai", "private");
        m.set_trace_queue_depth(3);
        m.sync_trace_dropped(1);
        m.set_ledger_pending(2);
        m.sync_access_log_dropped(1);
        m.set_replica_healthy("vllm", "10.0.0.5:8000", true);
        m.record_config_reload(true);
        guards
    }

    const FAMILIES: &[(&str, &str)] = &[
        ("llm_edge_requests_total", "counter"),
        ("llm_edge_request_duration_seconds", "histogram"),
        ("llm_edge_upstream_duration_seconds", "histogram"),
        ("llm_edge_upstream_ttfb_seconds", "histogram"),
        ("llm_edge_proxy_overhead_seconds", "histogram"),
        ("llm_edge_active_requests", "gauge"),
        ("llm_edge_active_streams", "gauge"),
        ("llm_edge_tokens_total", "counter"),
        ("llm_edge_upstream_retries_total", "counter"),
        ("llm_edge_upstream_failovers_total", "counter"),
        ("llm_edge_key_state", "gauge"),
        ("llm_edge_rejected_total", "counter"),
        ("llm_edge_egress_refused_total", "counter"),
        ("llm_edge_trace_queue_depth", "gauge"),
        ("llm_edge_trace_dropped_total", "counter"),
        ("llm_edge_ledger_pending", "gauge"),
        ("llm_edge_access_log_dropped_total", "counter"),
        ("llm_edge_replica_healthy", "gauge"),
        ("llm_edge_config_reloads_total", "counter"),
        ("llm_edge_config_last_reload_timestamp_seconds", "gauge"),
        ("llm_edge_build_info", "gauge"),
    ];

    #[test]
    fn counts_land_in_their_own_series() {
        let m = Metrics::new();
        m.record_request(
            RequestKind::Api,
            "gpt",
            "openai",
            200,
            Duration::from_millis(3),
        );
        m.record_request(
            RequestKind::Api,
            "gpt",
            "openai",
            201,
            Duration::from_millis(3),
        );
        m.record_request(
            RequestKind::Api,
            "gpt",
            "openai",
            503,
            Duration::from_millis(3),
        );
        m.record_request(RequestKind::Local, "-", "-", 204, Duration::from_micros(50));
        let get = |k: &str, model: &str, up: &str, class: &str| {
            m.requests
                .family()
                .with_label_values(&[k, model, up, class])
                .get()
        };
        assert_eq!(get("api", "gpt", "openai", "2xx"), 2);
        assert_eq!(get("api", "gpt", "openai", "5xx"), 1);
        assert_eq!(get("local", "-", "-", "2xx"), 1);
        let h = m
            .request_duration
            .family()
            .with_label_values(&["api", "openai"]);
        assert_eq!(h.get_sample_count(), 3);

        m.add_tokens("gpt", "openai", "k1", "team-a", 7, 0);
        m.add_tokens("gpt", "openai", "k1", "team-a", 3, 5);
        let tok = |dir: &str| {
            m.tokens
                .family()
                .with_label_values(&[dir, "gpt", "openai", "k1", "team-a"])
                .get()
        };
        assert_eq!((tok("in"), tok("out")), (10, 5));

        m.count_retry("openai", RetryReason::RateLimited);
        m.count_failover("openai", RetryReason::ConnectError);
        assert_eq!(
            m.retries
                .with_label_values(&["openai", "rate_limited"])
                .get(),
            1
        );
        assert_eq!(
            m.failovers
                .with_label_values(&["openai", "connect_error"])
                .get(),
            1
        );

        m.count_rejected(RejectReason::BodyTooLarge);
        assert_eq!(m.rejected.with_label_values(&["body_too_large"]).get(), 1);
        assert_eq!(m.rejected.with_label_values(&["auth"]).get(), 0);

        // A second instance counts alone.
        let other = Metrics::new();
        assert_eq!(
            other
                .requests
                .family()
                .with_label_values(&["api", "gpt", "openai", "2xx"])
                .get(),
            0
        );
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(499), "4xx");
        assert_eq!(status_class(0), "other");
    }

    #[test]
    fn guards_decrement_on_drop() {
        let m = Metrics::new();
        let a = m.request_guard();
        let b = m.request_guard();
        let s = m.stream_guard();
        assert_eq!(m.active_requests.get(), 2);
        assert_eq!(m.active_streams.get(), 1);
        drop(a);
        assert_eq!(m.active_requests.get(), 1);
        // A guard moved into a task that is cancelled still gives its count back.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let task = tokio::spawn(async move {
                let _held = (b, s);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
            tokio::task::yield_now().await;
            task.abort();
            let _ = task.await;
        });
        assert_eq!(m.active_requests.get(), 0);
        assert_eq!(m.active_streams.get(), 0);
    }

    #[test]
    fn counter_sync_adds_deltas_and_never_decreases() {
        let m = Metrics::new();
        m.sync_trace_dropped(5);
        assert_eq!(m.trace_dropped.get(), 5);
        m.sync_trace_dropped(5);
        assert_eq!(m.trace_dropped.get(), 5);
        m.sync_trace_dropped(8);
        assert_eq!(m.trace_dropped.get(), 8);
        m.sync_trace_dropped(2);
        assert_eq!(m.trace_dropped.get(), 8);
        m.sync_trace_dropped(9);
        assert_eq!(m.trace_dropped.get(), 9);
        m.sync_access_log_dropped(4);
        m.sync_access_log_dropped(1);
        assert_eq!(m.access_log_dropped.get(), 4);
        assert_eq!(m.trace_dropped.get(), 9);
    }

    #[test]
    fn key_states_are_one_hot_and_can_be_forgotten() {
        let m = Metrics::new();
        m.set_key_state("openai", "k1", KeyStateLabel::Up);
        m.set_key_state("openai", "k1", KeyStateLabel::Cooling);
        m.set_key_state("openai", "k2", KeyStateLabel::Dead);
        let v = |k: &str, s: &str| m.key_state.with_label_values(&["openai", k, s]).get();
        assert_eq!(
            (v("k1", "up"), v("k1", "cooling"), v("k1", "dead")),
            (0, 1, 0)
        );
        assert_eq!(v("k2", "dead"), 1);
        m.reset_key_states();
        m.set_key_state("openai", "k1", KeyStateLabel::Up);
        let t = text(&m);
        assert!(t.contains(r#"llm_edge_key_state{key_id="k1",state="up",upstream="openai"} 1"#));
        assert!(!t.contains(r#"key_id="k2""#), "{t}");
    }

    #[test]
    fn render_has_every_family_with_help_and_type() {
        let m = Metrics::new();
        let _guards = touch_all(&m);
        let t = text(&m);
        for (name, kind) in FAMILIES {
            assert!(
                t.contains(&format!("\n# HELP {name} "))
                    || t.starts_with(&format!("# HELP {name} ")),
                "{name} HELP"
            );
            assert!(
                t.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} TYPE"
            );
        }
        let version = env!("CARGO_PKG_VERSION");
        assert!(t.contains(&format!("llm_edge_build_info{{version=\"{version}\"}} 1\n")));
        assert!(t.contains("llm_edge_active_requests 1\n"));
        assert!(
            t.contains("llm_edge_upstream_ttfb_seconds_bucket{upstream=\"openai\",le=\"600\"} 1\n")
        );
        assert!(
            t.contains("llm_edge_proxy_overhead_seconds_bucket{kind=\"api\",le=\"0.0001\"} 1\n")
        );
        assert!(t.contains("llm_edge_rejected_total{reason=\"overloaded\"} 0\n"));
    }

    #[test]
    fn default_registry_families_are_appended_once() {
        // Stands in for Pingora's families, plus one clashing with ours.
        let foreign = IntCounter::new("pingora_test_only_total", "A foreign family.").unwrap();
        let clash = IntCounter::new("llm_edge_requests_total", "A clashing family.").unwrap();
        foreign.inc();
        clash.inc();
        let _ = prometheus::register(Box::new(foreign));
        let _ = prometheus::register(Box::new(clash));

        let m = Metrics::new();
        m.record_request(
            RequestKind::Api,
            "gpt",
            "openai",
            200,
            Duration::from_millis(3),
        );
        let t = text(&m);
        assert!(t.contains("# TYPE pingora_test_only_total counter\npingora_test_only_total 1\n"));
        assert_eq!(t.matches("# TYPE llm_edge_requests_total ").count(), 1);
        assert!(!t.contains("A clashing family."));
    }
}
