//! Observation of responses on the side of the forwarding path.

pub mod access_log;
pub mod ledger;
pub mod metrics;
pub mod series;
pub mod sse;
pub mod usage;

/// How long a background writer (access log, traces) waits after a batch before taking the
/// next: under load, records gather for one write instead of one wake-up per request; idle,
/// the writer blocks on its queue as before. Short, because a batch written in one go keeps
/// the core from the proxy for as long as it takes (10 ms batches added ~0.7 ms to the TTFB
/// p99 of traced streams on a shared core).
pub const WRITER_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// The `/metrics` body: state gauges refreshed from the current snapshot, then rendered.
pub fn scrape(rt: &crate::runtime::Runtime) -> bytes::Bytes {
    use metrics::KeyStateLabel;
    let m = &rt.metrics;
    let snap = rt.state.load_full();
    m.reset_key_states();
    m.reset_replica_health();
    for up in snap.upstreams.values() {
        for k in up.keys.keys() {
            let state = if k.state.is_dead() {
                KeyStateLabel::Dead
            } else if !k.state.max_cooldown_left().is_zero() {
                KeyStateLabel::Cooling
            } else {
                KeyStateLabel::Up
            };
            m.set_key_state(&up.cfg.name, &k.id, state);
        }
        for (label, healthy) in up.replica_health() {
            m.set_replica_healthy(&up.cfg.name, &label, healthy);
        }
    }
    m.set_trace_queue_depth(rt.tracer.depth() as u64);
    m.sync_trace_dropped(rt.tracer.dropped());
    if let Some(l) = &rt.ledger {
        m.set_ledger_pending(l.pending());
    }
    m.sync_access_log_dropped(rt.access_log.dropped());
    bytes::Bytes::from(m.render())
}
