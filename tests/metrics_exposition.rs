//! The /metrics text passes `promtool check metrics` (format and lint), with every family
//! present and a default-registry family (as Pingora registers them) appended once.

use llm_edge::observe::metrics::{KeyStateLabel, Metrics, RejectReason, RequestKind, RetryReason};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

fn promtool_available() -> bool {
    Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn exposition_passes_promtool_check() {
    // A family in the default registry, plus one clashing with ours that must be skipped.
    let foreign = prometheus::IntCounter::new("pingora_exposition_test_total", "Foreign.").unwrap();
    let clash = prometheus::IntGauge::new("llm_edge_active_streams", "Clashing.").unwrap();
    foreign.inc();
    prometheus::register(Box::new(foreign)).unwrap();
    prometheus::register(Box::new(clash)).unwrap();

    let m = Metrics::new();
    m.mark_config_loaded(SystemTime::now());
    m.record_request(
        RequestKind::Api,
        "gpt-4o",
        "openai",
        200,
        Duration::from_millis(420),
    );
    m.record_request(
        RequestKind::Passthrough,
        "-",
        "vllm",
        101,
        Duration::from_secs(2),
    );
    m.record_request(
        RequestKind::Models,
        "-",
        "-",
        200,
        Duration::from_micros(300),
    );
    m.record_request(RequestKind::Local, "-", "-", 401, Duration::from_micros(90));
    m.observe_upstream_duration("openai", Duration::from_millis(410));
    m.observe_upstream_ttfb("openai", Duration::from_millis(120));
    m.observe_overhead(RequestKind::Api, Duration::from_micros(70));
    let _request = m.request_guard();
    let _stream = m.stream_guard();
    m.add_tokens("gpt-4o", "openai", "key-a", "anonymous", 1200, 345);
    m.count_retry("openai", RetryReason::RateLimited);
    m.count_failover("openai", RetryReason::Timeout);
    m.set_key_state("openai", "key-a", KeyStateLabel::Up);
    m.set_key_state("openai", "key-b", KeyStateLabel::Cooling);
    for reason in RejectReason::ALL {
        m.count_rejected(reason);
    }
    m.count_egress_refused("vllm", "private");
    m.set_trace_queue_depth(4);
    m.sync_trace_dropped(2);
    m.set_ledger_pending(1);
    m.sync_access_log_dropped(3);
    m.set_replica_healthy("vllm", "10.0.0.5:8000", true);
    m.set_replica_healthy("vllm", "10.0.0.6:8000", false);
    m.record_config_reload(true);
    m.record_config_reload(false);

    let text = String::from_utf8(m.render()).unwrap();
    for family in [
        "llm_edge_requests_total",
        "llm_edge_request_duration_seconds",
        "llm_edge_upstream_duration_seconds",
        "llm_edge_upstream_ttfb_seconds",
        "llm_edge_proxy_overhead_seconds",
        "llm_edge_active_requests",
        "llm_edge_active_streams",
        "llm_edge_tokens_total",
        "llm_edge_upstream_retries_total",
        "llm_edge_upstream_failovers_total",
        "llm_edge_key_state",
        "llm_edge_rejected_total",
        "llm_edge_egress_refused_total",
        "llm_edge_trace_queue_depth",
        "llm_edge_trace_dropped_total",
        "llm_edge_ledger_pending",
        "llm_edge_access_log_dropped_total",
        "llm_edge_replica_healthy",
        "llm_edge_config_reloads_total",
        "llm_edge_config_last_reload_timestamp_seconds",
        "llm_edge_build_info",
        "pingora_exposition_test_total",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{family} once in:\n{text}"
        );
    }
    assert!(!text.contains("Clashing."));

    if !promtool_available() {
        if std::env::var("LLM_EDGE_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
            panic!("promtool not found on PATH and LLM_EDGE_REQUIRE_PROMTOOL=1");
        }
        eprintln!("note: promtool not on PATH; skipping `promtool check metrics`");
        return;
    }

    let path = std::env::temp_dir().join(format!(
        "llm-edge-metrics-exposition-{}.prom",
        std::process::id()
    ));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\nstdout: {}\nstderr: {}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
