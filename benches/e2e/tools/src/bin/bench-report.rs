//! `bench-report`: turns the raw measurements of `run.sh` into the results table and JSON.
//!
//! Input (`--raw FILE`): one JSON object per line and measurement:
//! `{"round":1,"scenario":"s1","target":"nginx","load":{…},"proxy":{"cpu_ns":N,"cpu_ticks":N,
//! "rss_kb":N,"alive":true}}` where `load` is the `wrk` summary (S1, S2) or the `bench-sse` report (S3–S5)
//! and `proxy` is null for the direct target; `edge-traced` lines also carry `"traces":N` (trace
//! records written during the run) and `"traces_dropped":N` (null when the flush failed). Every
//! figure is computed per round, then the median over rounds is taken; "extra" figures of S4 are
//! differences to the direct target of the same round. A target without measurements in a
//! scenario (`edge-traced` runs only in S1, S3 and S3L; `pingora-min` and `edge-pass` not in S3L)
//! shows `-`. Below the table, the cost of tracing every call (`edge-traced` against `edge-api`,
//! from the medians): one line for S3, one for S3L (vLLM-shaped chunks with logprobs and token
//! ids), each when the scenario has both targets. Prints the table on stdout and writes
//! `{meta, summary, tracing_cost, tracing_cost_s3l, problems, raw}` to `--out`: `tracing_cost` is
//! S3's (its key and shape predate S3L), `tracing_cost_s3l` the same object for S3L; each is null
//! without its line.
//!
//! Usage: `bench-report --raw raw.jsonl --clk-tck 100 --meta meta.json --out results.json`

use llm_edge_e2e_tools::Flags;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Target names in table order; ratios are to `nginx`. `pingora-min` (the Pingora floor) sits
/// next to nginx so llm-edge's columns read as that floor plus llm-edge's own cost;
/// `edge-traced` (edge-api with a trace record for every call) next to `edge-api`.
const TARGETS: [&str; 6] = [
    "direct",
    "nginx",
    "pingora-min",
    "edge-api",
    "edge-traced",
    "edge-pass",
];
const BASELINE: &str = "nginx";
/// The tracing cost compares these two targets in the scenarios of `TRACING_SCENARIOS`.
const UNTRACED: &str = "edge-api";
const TRACED: &str = "edge-traced";
/// Goal: tracing every call raises CPU per stream (S3, S3L) by at most this much (and TTFB not
/// at all).
const TRACING_CPU_TARGET_PCT: f64 = 25.0;
/// Scenarios whose tracing cost is reported, in the order of their lines: scenario, its name in
/// the line, the key of its figures in the JSON output.
const TRACING_SCENARIOS: [(&str, &str, &str); 2] = [
    ("s3", "S3", "tracing_cost"),
    ("s3l", "S3L", "tracing_cost_s3l"),
];

/// How a figure is combined over rounds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Combine {
    /// Median of the per-round values.
    Median,
    /// Sum over rounds (counts).
    Sum,
}

struct Metric {
    key: &'static str,
    label: &'static str,
    combine: Combine,
    /// No ratio column (counts).
    ratio: bool,
    /// Shown in the table (otherwise only in the JSON summary).
    table: bool,
    get: fn(&Measurement, &Ctx) -> Option<f64>,
}

/// One measurement line.
struct Measurement {
    round: u64,
    scenario: String,
    target: String,
    load: Value,
    proxy: Option<Value>,
    /// `edge-traced`: trace records written during the run.
    traces: Option<f64>,
    /// `edge-traced`: records dropped during the run (queue full); `Some(None)` when `traces` is
    /// recorded but the flush that counts drops failed.
    traces_dropped: Option<Option<f64>>,
}

/// Per-computation context: the tick rate and the direct measurement of the same round.
struct Ctx<'a> {
    clk_tck: f64,
    direct: Option<&'a Measurement>,
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_f64()
}

impl Measurement {
    fn wrk_requests(&self) -> Option<f64> {
        f(&self.load, &["requests"])
    }

    fn wrk_errors(&self) -> Option<f64> {
        let e = self.load.get("errors")?;
        Some(
            ["connect", "read", "write", "status", "timeout"]
                .iter()
                .filter_map(|k| f(e, &[k]))
                .sum(),
        )
    }

    fn sse(&self, path: &[&str]) -> Option<f64> {
        f(&self.load, path)
    }

    /// Proxy CPU time in µs per unit of work (requests or streams), from the on-CPU time of
    /// the proxy's threads (`cpu_ns`, ns resolution) when recorded, else from utime + stime.
    fn cpu_us_per(&self, units: Option<f64>, c: &Ctx) -> Option<f64> {
        match f(self.proxy.as_ref()?, &["cpu_ns"]) {
            Some(ns) => Some(ns / 1000.0 / units.filter(|u| *u > 0.0)?),
            None => self.cpu_us_per_ticks(units, c),
        }
    }

    /// Proxy CPU time in µs per unit of work from utime + stime (clock-tick resolution).
    fn cpu_us_per_ticks(&self, units: Option<f64>, c: &Ctx) -> Option<f64> {
        let ticks = f(self.proxy.as_ref()?, &["cpu_ticks"])?;
        let units = units.filter(|u| *u > 0.0)?;
        Some(ticks / c.clk_tck * 1e6 / units)
    }

    fn rss_mb(&self) -> Option<f64> {
        Some(f(self.proxy.as_ref()?, &["rss_kb"])? / 1024.0)
    }
}

fn extra(m: &Measurement, c: &Ctx, path: &[&str]) -> Option<f64> {
    Some(m.sse(path)? - c.direct?.sse(path)?)
}

fn metrics(scenario: &str) -> Vec<Metric> {
    let m = |key, label, get| Metric {
        key,
        label,
        combine: Combine::Median,
        ratio: true,
        table: true,
        get,
    };
    let count = |key, label, get| Metric {
        key,
        label,
        combine: Combine::Sum,
        ratio: false,
        table: true,
        get,
    };
    let json_only = |key, label, get| Metric {
        key,
        label,
        combine: Combine::Median,
        ratio: true,
        table: false,
        get,
    };
    match scenario {
        "s1" | "s2" => vec![
            m("rps", "requests/s", |x, _| {
                Some(x.wrk_requests()? / f(&x.load, &["duration_us"])? * 1e6)
            }),
            m("p50_ms", "latency p50 ms", |x, _| {
                Some(f(&x.load, &["latency_us", "p50"])? / 1000.0)
            }),
            m("p99_ms", "latency p99 ms", |x, _| {
                Some(f(&x.load, &["latency_us", "p99"])? / 1000.0)
            }),
            m("cpu_us", "proxy CPU µs/request", |x, c| {
                x.cpu_us_per(x.wrk_requests(), c)
            }),
            json_only(
                "cpu_us_ticks",
                "proxy CPU µs/request (utime+stime)",
                |x, c| x.cpu_us_per_ticks(x.wrk_requests(), c),
            ),
            count("requests", "requests (all rounds)", |x, _| x.wrk_requests()),
            count("errors", "errors (all rounds)", |x, _| x.wrk_errors()),
        ],
        "s3" | "s3l" => vec![
            m("ttfb_p50", "TTFB p50 ms", |x, _| x.sse(&["ttfb_ms", "p50"])),
            m("ttfb_p99", "TTFB p99 ms", |x, _| x.sse(&["ttfb_ms", "p99"])),
            m("total_p50", "total p50 ms", |x, _| {
                x.sse(&["total_ms", "p50"])
            }),
            m("total_p99", "total p99 ms", |x, _| {
                x.sse(&["total_ms", "p99"])
            }),
            m("streams_per_s", "streams/s", |x, _| {
                x.sse(&["streams_per_s"])
            }),
            m("cpu_us", "proxy CPU µs/stream", |x, c| {
                x.cpu_us_per(x.sse(&["streams"]), c)
            }),
            json_only(
                "cpu_us_ticks",
                "proxy CPU µs/stream (utime+stime)",
                |x, c| x.cpu_us_per_ticks(x.sse(&["streams"]), c),
            ),
            count("streams", "streams (all rounds)", |x, _| {
                x.sse(&["streams"])
            }),
            count("done", "ended with [DONE]", |x, _| x.sse(&["done"])),
            count("failures", "failures", |x, _| x.sse(&["failures"])),
            count("connections", "client connections", |x, _| {
                x.sse(&["connections"])
            }),
            count("close_delimited", "close-delimited replies", |x, _| {
                x.sse(&["close_delimited"])
            }),
        ],
        "s4" => vec![
            m("ttfb_p50", "TTFB p50 ms", |x, _| x.sse(&["ttfb_ms", "p50"])),
            m("ttfb_p99", "TTFB p99 ms", |x, _| x.sse(&["ttfb_ms", "p99"])),
            m("gap_p99", "gap p99 ms", |x, _| x.sse(&["gap_ms", "p99"])),
            m("extra_ttfb_p50", "extra TTFB p50 ms", |x, c| {
                extra(x, c, &["ttfb_ms", "p50"])
            }),
            m("extra_ttfb_p99", "extra TTFB p99 ms", |x, c| {
                extra(x, c, &["ttfb_ms", "p99"])
            }),
            m("extra_gap_p99", "extra gap p99 ms", |x, c| {
                extra(x, c, &["gap_ms", "p99"])
            }),
            m("cpu_us", "proxy CPU µs/stream", |x, c| {
                x.cpu_us_per(x.sse(&["streams"]), c)
            }),
            json_only(
                "cpu_us_ticks",
                "proxy CPU µs/stream (utime+stime)",
                |x, c| x.cpu_us_per_ticks(x.sse(&["streams"]), c),
            ),
            count("streams", "streams (all rounds)", |x, _| {
                x.sse(&["streams"])
            }),
            count("done", "ended with [DONE]", |x, _| x.sse(&["done"])),
            count("failures", "failures", |x, _| x.sse(&["failures"])),
            count("connections", "client connections", |x, _| {
                x.sse(&["connections"])
            }),
            count("close_delimited", "close-delimited replies", |x, _| {
                x.sse(&["close_delimited"])
            }),
        ],
        "s5" => vec![
            m("rss_mb", "proxy peak RSS MiB", |x, _| x.rss_mb()),
            m("cpu_us", "proxy CPU µs/stream", |x, c| {
                x.cpu_us_per(x.sse(&["streams"]), c)
            }),
            json_only(
                "cpu_us_ticks",
                "proxy CPU µs/stream (utime+stime)",
                |x, c| x.cpu_us_per_ticks(x.sse(&["streams"]), c),
            ),
            m("total_p99", "total p99 ms", |x, _| {
                x.sse(&["total_ms", "p99"])
            }),
            count("streams", "streams (all rounds)", |x, _| {
                x.sse(&["streams"])
            }),
            count("done", "ended with [DONE]", |x, _| x.sse(&["done"])),
            count("failures", "failures", |x, _| x.sse(&["failures"])),
            count("connections", "client connections", |x, _| {
                x.sse(&["connections"])
            }),
            count("close_delimited", "close-delimited replies", |x, _| {
                x.sse(&["close_delimited"])
            }),
        ],
        _ => Vec::new(),
    }
}

const SCENARIOS: [(&str, &str); 6] = [
    ("s1", "S1 non-stream, ~300 B body"),
    ("s2", "S2 non-stream, ~100 KB body"),
    ("s3", "S3 streams, 20 chunks, no delay"),
    (
        "s3l",
        "S3L streams, 20 chunks with logprobs and token ids (vLLM)",
    ),
    ("s4", "S4 streams, 50 ms first, 20 ms gaps"),
    ("s5", "S5 1,000 concurrent slow streams"),
];

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn parse_raw(text: &str) -> Result<Vec<Measurement>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("line {}: missing {k:?}", i + 1))
        };
        out.push(Measurement {
            round: v.get("round").and_then(Value::as_u64).unwrap_or(0),
            scenario: s("scenario")?,
            target: s("target")?,
            load: v.get("load").cloned().unwrap_or(Value::Null),
            proxy: v.get("proxy").filter(|p| !p.is_null()).cloned(),
            traces: v.get("traces").and_then(Value::as_f64),
            traces_dropped: v
                .get("traces")
                .map(|_| v.get("traces_dropped").and_then(Value::as_f64)),
        });
    }
    Ok(out)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench-report: {e}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<(), String> {
    let flags = Flags::from_env(&[])?;
    let raw_path = flags.required("raw")?;
    let raw_text =
        std::fs::read_to_string(raw_path).map_err(|e| format!("reading {raw_path}: {e}"))?;
    let raw = parse_raw(&raw_text)?;
    let clk_tck: f64 = flags.parsed("clk-tck", 100.0)?;
    let meta: Value = match flags.get("meta") {
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|e| format!("reading {p}: {e}"))?;
            serde_json::from_str(&t).map_err(|e| format!("{p}: {e}"))?
        }
        None => Value::Null,
    };

    let report = build_report(&raw, clk_tck);
    print!("{}", report.table);
    for line in &report.tracing_lines {
        println!("{line}");
    }
    if report.notes.is_empty() {
        println!("no failures");
    } else {
        println!("problems:");
        for n in &report.notes {
            println!("  {n}");
        }
    }
    if let Some(out) = flags.get("out") {
        let raw_values: Vec<Value> = raw_text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let mut doc = json!({
            "meta": meta,
            "summary": report.summary,
            "problems": report.notes,
            "raw": raw_values,
        });
        for (key, v) in report.tracing_costs {
            doc[key] = v;
        }
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(out, text + "\n").map_err(|e| format!("writing {out}: {e}"))?;
    }
    if report.notes.is_empty() {
        Ok(())
    } else {
        // Still a complete report; the exit status tells scripts something failed.
        std::process::exit(1)
    }
}

/// What `bench-report` prints and writes.
struct Report {
    /// The table, one line per figure (with its trailing newline).
    table: String,
    /// Per scenario, figure and target: value, ratio to nginx, per-round values.
    summary: Map<String, Value>,
    /// "tracing on every call: …", S3 then S3L, for each of them that has both edge-api and
    /// edge-traced.
    tracing_lines: Vec<String>,
    /// The same figures as JSON, per `TRACING_SCENARIOS` entry: its JSON key (`tracing_cost`,
    /// `tracing_cost_s3l`) and the figures, null when the scenario has no line.
    tracing_costs: Vec<(&'static str, Value)>,
    /// The "problems" list.
    notes: Vec<String>,
}

/// Medians (or sums) over rounds: (scenario, figure key) -> target -> value.
type Combined = BTreeMap<(&'static str, &'static str), BTreeMap<&'static str, f64>>;

fn build_report(raw: &[Measurement], clk_tck: f64) -> Report {
    let mut summary = Map::new();
    let mut table = String::new();
    let mut notes: Vec<String> = Vec::new();
    let mut all_combined = Combined::new();
    let w = 24;
    let _ = writeln!(
        table,
        "{:<26}{}",
        "figure",
        TARGETS
            .iter()
            .map(|t| format!("{t:>w$}"))
            .collect::<String>()
    );
    for (scenario, title) in SCENARIOS {
        let of_scenario: Vec<&Measurement> =
            raw.iter().filter(|m| m.scenario == scenario).collect();
        if of_scenario.is_empty() {
            continue;
        }
        let _ = writeln!(table, "{title}");
        let mut s_json = Map::new();
        for metric in metrics(scenario) {
            // Per target: the per-round values.
            let mut per_target: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            for m in &of_scenario {
                let direct = of_scenario
                    .iter()
                    .find(|d| d.target == "direct" && d.round == m.round)
                    .copied();
                let ctx = Ctx { clk_tck, direct };
                if let Some(v) = (metric.get)(m, &ctx) {
                    if let Some(t) = TARGETS.iter().find(|t| **t == m.target) {
                        per_target.entry(t).or_default().push(v);
                    }
                }
            }
            let combined: BTreeMap<&'static str, f64> = per_target
                .iter()
                .filter_map(|(t, vals)| {
                    let mut vals = vals.clone();
                    let v = match metric.combine {
                        Combine::Median => median(&mut vals)?,
                        Combine::Sum => vals.iter().sum(),
                    };
                    Some((*t, v))
                })
                .collect();
            let base = combined.get(BASELINE).copied();
            let mut m_json = Map::new();
            let mut row = format!("  {:<24}", metric.label);
            for t in TARGETS {
                let cell = match combined.get(t) {
                    None => "-".to_string(),
                    Some(v) => {
                        let ratio = base
                            .filter(|b| metric.ratio && b.abs() > 1e-9)
                            .map(|b| v / b);
                        m_json.insert(
                            t.to_string(),
                            json!({
                                "value": round3(*v),
                                "ratio_to_nginx": ratio.map(round3),
                                "rounds": per_target[t].iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                            }),
                        );
                        match ratio {
                            Some(r) => format!("{} ({r:.2}x)", fmt_num(*v)),
                            None if metric.combine == Combine::Sum => format!("{v:.0}"),
                            None => fmt_num(*v),
                        }
                    }
                };
                let _ = write!(row, "{cell:>w$}");
            }
            if metric.table {
                let _ = writeln!(table, "{row}");
            }
            s_json.insert(
                metric.key.to_string(),
                json!({
                    "label": metric.label,
                    "combine": if metric.combine == Combine::Sum { "sum" } else { "median" },
                    "targets": m_json,
                }),
            );
            all_combined.insert((scenario, metric.key), combined);
        }
        summary.insert(scenario.to_string(), Value::Object(s_json));
        for m in &of_scenario {
            let kinds = m
                .load
                .get("failure_kinds")
                .and_then(Value::as_object)
                .filter(|k| !k.is_empty());
            if let Some(k) = kinds {
                notes.push(format!(
                    "{scenario} round {} {}: failures {}",
                    m.round,
                    m.target,
                    Value::Object(k.clone())
                ));
            }
            let wrk_errors = m.wrk_errors().filter(|e| *e > 0.0);
            if let Some(e) = wrk_errors {
                notes.push(format!(
                    "{scenario} round {} {}: {e} wrk errors {}",
                    m.round, m.target, m.load["errors"]
                ));
            }
            let dead = m
                .proxy
                .as_ref()
                .and_then(|p| p.get("alive"))
                .and_then(Value::as_bool)
                == Some(false);
            if dead {
                notes.push(format!(
                    "{scenario} round {} {}: the proxy process died during the measurement",
                    m.round, m.target
                ));
            }
            let unframed = m.sse(&["close_delimited"]).filter(|n| *n > 0.0);
            if let Some(n) = unframed {
                notes.push(format!(
                    "{scenario} round {} {}: {n} stream replies had no HTTP framing (neither \
                     Content-Length nor chunked: the body ends by closing the connection)",
                    m.round, m.target
                ));
            }
            if m.load.is_null() {
                notes.push(format!(
                    "{scenario} round {} {}: no result from the load tool",
                    m.round, m.target
                ));
            }
            notes.extend(trace_notes(scenario, m));
        }
    }
    let mut tracing_lines = Vec::new();
    let mut tracing_costs = Vec::new();
    for (scenario, name, key) in TRACING_SCENARIOS {
        let v = match tracing_cost(&all_combined, raw, scenario, name) {
            Some((line, v)) => {
                tracing_lines.push(line);
                v
            }
            None => Value::Null,
        };
        tracing_costs.push((key, v));
    }
    Report {
        table,
        summary,
        tracing_lines,
        tracing_costs,
        notes,
    }
}

/// Problems with the trace records of an `edge-traced` measurement: dropped records, a failed
/// flush, or (S3, S3L) fewer records than streams that ended with `[DONE]`, so not every call was
/// traced and the measurement does not show the cost of tracing every call.
fn trace_notes(scenario: &str, m: &Measurement) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(traces) = m.traces else {
        return notes;
    };
    let at = format!("{scenario} round {} {}", m.round, m.target);
    match m.traces_dropped {
        Some(Some(d)) if d > 0.0 => notes.push(format!(
            "{at}: {d} trace records dropped (the trace queue was full)"
        )),
        Some(None) => notes.push(format!(
            "{at}: POST /admin/traces/flush failed (trace records not all counted)"
        )),
        _ => {}
    }
    if TRACING_SCENARIOS.iter().any(|(s, _, _)| *s == scenario) {
        if let Some(done) = m.sse(&["done"]).filter(|d| traces < *d) {
            notes.push(format!(
                "{at}: {traces} trace records for {done} streams ended with [DONE] (every call \
                 should have one)"
            ));
        }
    }
    notes
}

/// The cost of tracing every call, from the medians of `edge-traced` and `edge-api` in
/// `scenario` (`name` in the line): the line printed below the table and its JSON. None unless
/// both targets have the three figures there.
fn tracing_cost(
    c: &Combined,
    raw: &[Measurement],
    scenario: &'static str,
    name: &str,
) -> Option<(String, Value)> {
    let get = |key: &'static str, t: &str| c.get(&(scenario, key))?.get(t).copied();
    let (cpu_a, cpu_t) = (get("cpu_us", UNTRACED)?, get("cpu_us", TRACED)?);
    let (p50_a, p50_t) = (get("ttfb_p50", UNTRACED)?, get("ttfb_p50", TRACED)?);
    let (p99_a, p99_t) = (get("ttfb_p99", UNTRACED)?, get("ttfb_p99", TRACED)?);
    let cpu_pct = (cpu_a > 0.0).then(|| (cpu_t / cpu_a - 1.0) * 100.0)?;
    let (d50, d99) = (p50_t - p50_a, p99_t - p99_a);
    let line = format!(
        "tracing on every call: {name} CPU/stream {cpu_pct:+.1}% (target <= {TRACING_CPU_TARGET_PCT:.0}%), \
         TTFB p50 {d50:+.3} ms, p99 {d99:+.3} ms"
    );
    let rounds: Vec<Value> = raw
        .iter()
        .filter(|m| m.scenario == scenario && m.target == TRACED)
        .map(|m| {
            json!({
                "round": m.round,
                "traces": m.traces,
                "traces_dropped": m.traces_dropped.flatten(),
                "streams": m.sse(&["streams"]),
                "done": m.sse(&["done"]),
            })
        })
        .collect();
    let pair = |a: f64, t: f64, delta: &str, d: f64| {
        let mut v = Map::new();
        v.insert(UNTRACED.to_string(), json!(round3(a)));
        v.insert(TRACED.to_string(), json!(round3(t)));
        v.insert(delta.to_string(), json!(round3(d)));
        Value::Object(v)
    };
    let mut cpu = pair(cpu_a, cpu_t, "increase_pct", cpu_pct);
    cpu["target_max_pct"] = json!(TRACING_CPU_TARGET_PCT);
    cpu["within_target"] = json!(cpu_pct <= TRACING_CPU_TARGET_PCT);
    let v = json!({
        "scenario": scenario,
        "baseline": UNTRACED,
        "traced": TRACED,
        "cpu_us_per_stream": cpu,
        "ttfb_p50_ms": pair(p50_a, p50_t, "increase_ms", d50),
        "ttfb_p99_ms": pair(p99_a, p99_t, "increase_ms", d99),
        "rounds": rounds,
    });
    Some((line, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw-result fields of an `edge-traced` run whose 1,000 calls were all traced.
    const ALL_TRACED: &str = r#","traces":1000,"traces_dropped":0"#;

    #[test]
    fn medians_and_extras() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
        let raw = parse_raw(concat!(
            r#"{"round":1,"scenario":"s4","target":"direct","load":{"streams":10,"ttfb_ms":{"p99":50.5}},"proxy":null}"#,
            "\n",
            r#"{"round":1,"scenario":"s4","target":"nginx","load":{"streams":10,"ttfb_ms":{"p99":51.0}},"proxy":{"cpu_ticks":2,"rss_kb":2048}}"#,
        ))
        .unwrap();
        let c = Ctx {
            clk_tck: 100.0,
            direct: Some(&raw[0]),
        };
        assert_eq!(extra(&raw[1], &c, &["ttfb_ms", "p99"]), Some(0.5));
        assert_eq!(raw[1].cpu_us_per(Some(10.0), &c), Some(2000.0));
        assert_eq!(raw[1].rss_mb(), Some(2.0));
        assert_eq!(raw[0].cpu_us_per(Some(10.0), &c), None);
    }

    /// An S3 `bench-sse` line: `cpu_ns` of proxy CPU for `streams` streams.
    fn s3(round: u64, target: &str, ttfb: (f64, f64), cpu_ns: u64, traces: &str) -> String {
        sse("s3", round, target, ttfb, cpu_ns, traces)
    }

    /// The same for S3L.
    fn s3l(round: u64, target: &str, ttfb: (f64, f64), cpu_ns: u64, traces: &str) -> String {
        sse("s3l", round, target, ttfb, cpu_ns, traces)
    }

    /// A `bench-sse` line of 1,000 streams in `scenario`.
    fn sse(
        scenario: &str,
        round: u64,
        target: &str,
        ttfb: (f64, f64),
        cpu_ns: u64,
        traces: &str,
    ) -> String {
        let proxy = if target == "direct" {
            "null".to_string()
        } else {
            format!(r#"{{"cpu_ns":{cpu_ns},"cpu_ticks":1,"rss_kb":1024,"alive":true}}"#)
        };
        format!(
            r#"{{"round":{round},"scenario":"{scenario}","target":"{target}","load":{{"streams":1000,"done":1000,"failures":0,"connections":16,"close_delimited":0,"ttfb_ms":{{"p50":{},"p99":{}}},"total_ms":{{"p50":1.0,"p99":2.0}},"streams_per_s":5000}},"proxy":{proxy},"mock":{{"cpu_ns":1}}{traces}}}"#,
            ttfb.0, ttfb.1
        )
    }

    /// An S2 `wrk` line.
    fn s2(round: u64, target: &str, cpu_ns: u64) -> String {
        format!(
            r#"{{"round":{round},"scenario":"s2","target":"{target}","load":{{"requests":1000,"duration_us":1000000,"latency_us":{{"p50":500,"p99":900}},"errors":{{"connect":0,"read":0,"write":0,"status":0,"timeout":0}}}},"proxy":{{"cpu_ns":{cpu_ns},"cpu_ticks":1,"rss_kb":1024,"alive":true}}}}"#
        )
    }

    /// The cells of a table row, one per target (labels may hold multi-byte characters).
    fn cells(row: &str) -> Vec<String> {
        let chars: Vec<char> = row.chars().collect();
        (0..TARGETS.len())
            .map(|i| {
                chars[26 + i * 24..26 + (i + 1) * 24]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            })
            .collect()
    }

    /// The JSON figures of the tracing cost under `key` (`tracing_cost`, `tracing_cost_s3l`).
    fn cost<'a>(r: &'a Report, key: &str) -> &'a Value {
        &r.tracing_costs.iter().find(|(k, _)| *k == key).unwrap().1
    }

    fn row<'a>(table: &'a str, scenario_title: &str, label: &str) -> &'a str {
        table
            .lines()
            .skip_while(|l| !l.starts_with(scenario_title))
            .find(|l| l.trim_start().starts_with(label))
            .unwrap()
    }

    #[test]
    fn missing_cells_and_tracing_cost() {
        let lines = [
            // S2: edge-traced does not run there.
            s2(1, "nginx", 10_000_000),
            s2(1, "edge-api", 30_000_000),
            s2(2, "nginx", 12_000_000),
            s2(2, "edge-api", 36_000_000),
            // S3, two rounds: edge-api 40 and 44 µs/stream (median 42), edge-traced 48 and 50
            // (median 49: +16.7 %); TTFB p50 medians 0.5 vs 0.55, p99 2.0 vs 2.25.
            s3(1, "direct", (0.2, 1.0), 0, ""),
            s3(1, "nginx", (0.4, 1.5), 20_000_000, ""),
            s3(1, "edge-api", (0.5, 2.0), 40_000_000, ""),
            s3(1, "edge-traced", (0.5, 2.0), 48_000_000, ALL_TRACED),
            s3(2, "direct", (0.2, 1.0), 0, ""),
            s3(2, "nginx", (0.4, 1.5), 20_000_000, ""),
            s3(2, "edge-api", (0.5, 2.0), 44_000_000, ""),
            s3(2, "edge-traced", (0.6, 2.5), 50_000_000, ALL_TRACED),
        ];
        let raw = parse_raw(&lines.join("\n")).unwrap();
        let r = build_report(&raw, 100.0);

        // The header has every target in order, edge-traced right after edge-api.
        let header: Vec<&str> = r.table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header[1..], TARGETS);

        // S2: "-" in the edge-traced column; the other cells and ratios are unaffected.
        let cpu = cells(row(&r.table, "S2 non-stream, ~100 KB body", "proxy CPU"));
        assert_eq!(
            cpu,
            ["-", "11.00 (1.00x)", "-", "33.00 (3.00x)", "-", "-"],
            "{}",
            r.table
        );
        let s2_cpu = &r.summary["s2"]["cpu_us"]["targets"];
        assert!(s2_cpu.get("edge-traced").is_none());
        assert_eq!(s2_cpu["edge-api"]["value"], json!(33.0));
        assert_eq!(s2_cpu["edge-api"]["ratio_to_nginx"], json!(3.0));
        let reqs = cells(row(
            &r.table,
            "S2 non-stream, ~100 KB body",
            "requests (all",
        ));
        assert_eq!(reqs[4], "-");
        assert_eq!(reqs[3], "2000");

        // S3: edge-traced has its cells, medians over its rounds.
        let cpu = cells(row(
            &r.table,
            "S3 streams, 20 chunks, no delay",
            "proxy CPU",
        ));
        assert_eq!(cpu[3], "42.00 (2.10x)");
        assert_eq!(cpu[4], "49.00 (2.45x)");
        assert_eq!(cpu[5], "-");
        assert_eq!(
            r.summary["s3"]["cpu_us"]["targets"]["edge-traced"]["rounds"],
            json!([48.0, 50.0])
        );

        assert_eq!(
            r.tracing_lines,
            [
                "tracing on every call: S3 CPU/stream +16.7% (target <= 25%), TTFB p50 +0.050 ms, \
              p99 +0.250 ms"
            ]
        );
        assert_eq!(cost(&r, "tracing_cost_s3l"), &Value::Null);
        let t = cost(&r, "tracing_cost");
        assert_eq!(t["scenario"], json!("s3"));
        assert_eq!(t["cpu_us_per_stream"]["edge-api"], json!(42.0));
        assert_eq!(t["cpu_us_per_stream"]["edge-traced"], json!(49.0));
        assert_eq!(t["cpu_us_per_stream"]["increase_pct"], json!(16.667));
        assert_eq!(t["cpu_us_per_stream"]["within_target"], json!(true));
        assert_eq!(t["ttfb_p50_ms"]["increase_ms"], json!(0.05));
        assert_eq!(t["ttfb_p99_ms"]["increase_ms"], json!(0.25));
        assert_eq!(t["rounds"][1]["traces"], json!(1000.0));
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn tracing_cost_needs_both_targets_and_checks_the_traces() {
        // No edge-traced in S3: no line, null JSON, table unchanged otherwise.
        let raw = parse_raw(
            &[
                s3(1, "nginx", (0.4, 1.5), 20_000_000, ""),
                s3(1, "edge-api", (0.5, 2.0), 40_000_000, ""),
            ]
            .join("\n"),
        )
        .unwrap();
        let r = build_report(&raw, 100.0);
        assert!(r.tracing_lines.is_empty());
        assert_eq!(cost(&r, "tracing_cost"), &Value::Null);
        assert_eq!(cost(&r, "tracing_cost_s3l"), &Value::Null);
        assert_eq!(cells(row(&r.table, "S3 streams", "proxy CPU"))[4], "-");

        // Missing and dropped trace records, a failed flush, a regression beyond the target
        // and a slower first byte.
        let raw = parse_raw(
            &[
                s3(1, "nginx", (0.4, 1.5), 20_000_000, ""),
                s3(1, "edge-api", (0.5, 2.0), 40_000_000, ""),
                s3(
                    1,
                    "edge-traced",
                    (0.4, 2.0),
                    60_000_000,
                    r#","traces":990,"traces_dropped":10"#,
                ),
                s3(
                    2,
                    "edge-traced",
                    (0.4, 2.0),
                    60_000_000,
                    r#","traces":1000,"traces_dropped":null"#,
                ),
            ]
            .join("\n"),
        )
        .unwrap();
        let r = build_report(&raw, 100.0);
        assert_eq!(
            r.tracing_lines,
            [
                "tracing on every call: S3 CPU/stream +50.0% (target <= 25%), TTFB p50 -0.100 ms, \
              p99 +0.000 ms"
            ]
        );
        assert_eq!(
            cost(&r, "tracing_cost")["cpu_us_per_stream"]["within_target"],
            json!(false)
        );
        assert_eq!(
            r.notes,
            [
                "s3 round 1 edge-traced: 10 trace records dropped (the trace queue was full)",
                "s3 round 1 edge-traced: 990 trace records for 1000 streams ended with [DONE] \
                 (every call should have one)",
                "s3 round 2 edge-traced: POST /admin/traces/flush failed (trace records not all \
                 counted)",
            ]
        );
    }

    /// S3 lines, then the same for S3L with other figures: edge-api 50 µs/stream, edge-traced 60
    /// (+20 %); TTFB p50 0.5 vs 0.6, p99 2.0 vs 1.8. S3L has no pingora-min or edge-pass.
    fn s3_and_s3l() -> Vec<String> {
        vec![
            s3(1, "direct", (0.2, 1.0), 0, ""),
            s3(1, "nginx", (0.4, 1.5), 20_000_000, ""),
            s3(1, "pingora-min", (0.4, 1.5), 30_000_000, ""),
            s3(1, "edge-api", (0.5, 2.0), 40_000_000, ""),
            s3(1, "edge-traced", (0.55, 2.25), 49_000_000, ALL_TRACED),
            s3(1, "edge-pass", (0.4, 1.5), 30_000_000, ""),
            s3l(1, "direct", (0.3, 1.1), 0, ""),
            s3l(1, "nginx", (0.5, 1.6), 25_000_000, ""),
            s3l(1, "edge-api", (0.5, 2.0), 50_000_000, ""),
            s3l(1, "edge-traced", (0.6, 1.8), 60_000_000, ALL_TRACED),
        ]
    }

    #[test]
    fn s3l_has_the_s3_rows_and_its_own_tracing_cost() {
        let raw = parse_raw(&s3_and_s3l().join("\n")).unwrap();
        let r = build_report(&raw, 100.0);
        let title = "S3L streams, 20 chunks with logprobs and token ids (vLLM)";
        // S3L comes right after S3, with the same rows.
        let titles: Vec<&str> = r.table.lines().filter(|l| l.starts_with('S')).collect();
        assert_eq!(titles, ["S3 streams, 20 chunks, no delay", title]);
        let rows_of = |t: &str| -> Vec<String> {
            r.table
                .lines()
                .skip_while(|l| *l != t)
                .skip(1)
                .take_while(|l| l.starts_with("  "))
                .map(|l| l.chars().take(26).collect::<String>().trim().to_string())
                .collect()
        };
        assert_eq!(rows_of(title), rows_of("S3 streams, 20 chunks, no delay"));
        assert!(rows_of(title).contains(&"proxy CPU µs/stream".to_string()));
        let cpu = cells(row(&r.table, title, "proxy CPU"));
        assert_eq!(
            cpu,
            [
                "-",
                "25.00 (1.00x)",
                "-",
                "50.00 (2.00x)",
                "60.00 (2.40x)",
                "-"
            ],
            "{}",
            r.table
        );
        assert_eq!(cells(row(&r.table, title, "streams (all"))[4], "1000");
        assert_eq!(
            r.summary["s3l"]["cpu_us"]["targets"]["edge-traced"]["value"],
            json!(60.0)
        );

        // One line per scenario, S3 first.
        assert_eq!(
            r.tracing_lines,
            [
                "tracing on every call: S3 CPU/stream +22.5% (target <= 25%), TTFB p50 +0.050 ms, \
                 p99 +0.250 ms",
                "tracing on every call: S3L CPU/stream +20.0% (target <= 25%), TTFB p50 +0.100 ms, \
                 p99 -0.200 ms",
            ]
        );
        // S3's JSON keeps its key; S3L's has the same shape under its own.
        assert_eq!(cost(&r, "tracing_cost")["scenario"], json!("s3"));
        assert_eq!(
            cost(&r, "tracing_cost")["cpu_us_per_stream"]["edge-traced"],
            json!(49.0)
        );
        let t = cost(&r, "tracing_cost_s3l");
        assert_eq!(t["scenario"], json!("s3l"));
        assert_eq!(t["cpu_us_per_stream"]["edge-api"], json!(50.0));
        assert_eq!(t["cpu_us_per_stream"]["edge-traced"], json!(60.0));
        assert_eq!(t["cpu_us_per_stream"]["increase_pct"], json!(20.0));
        assert_eq!(t["cpu_us_per_stream"]["within_target"], json!(true));
        assert_eq!(t["ttfb_p50_ms"]["increase_ms"], json!(0.1));
        assert_eq!(t["ttfb_p99_ms"]["increase_ms"], json!(-0.2));
        assert_eq!(
            t["rounds"],
            json!([{"round": 1, "traces": 1000.0, "traces_dropped": 0.0, "streams": 1000.0, "done": 1000.0}])
        );
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn s3l_line_needs_both_targets_and_checks_the_traces() {
        // S3L without edge-traced: S3's line only, S3L's JSON null, "-" in its column.
        let lines: Vec<String> = s3_and_s3l()
            .into_iter()
            .filter(|l| !l.contains(r#""scenario":"s3l","target":"edge-traced""#))
            .collect();
        let r = build_report(&parse_raw(&lines.join("\n")).unwrap(), 100.0);
        assert_eq!(r.tracing_lines.len(), 1);
        assert!(r.tracing_lines[0].starts_with("tracing on every call: S3 CPU"));
        assert_ne!(cost(&r, "tracing_cost"), &Value::Null);
        assert_eq!(cost(&r, "tracing_cost_s3l"), &Value::Null);
        let title = "S3L streams, 20 chunks with logprobs and token ids (vLLM)";
        assert_eq!(cells(row(&r.table, title, "proxy CPU"))[4], "-");

        // S3L alone (ONLY="s3l"): its line only, S3's JSON null; missing trace records of S3L
        // are reported like S3's.
        let lines: Vec<String> = s3_and_s3l()
            .into_iter()
            .filter(|l| l.contains(r#""scenario":"s3l""#))
            .map(|l| l.replace(r#""traces":1000"#, r#""traces":998"#))
            .collect();
        let r = build_report(&parse_raw(&lines.join("\n")).unwrap(), 100.0);
        assert_eq!(
            r.tracing_lines,
            ["tracing on every call: S3L CPU/stream +20.0% (target <= 25%), TTFB p50 +0.100 ms, \
              p99 -0.200 ms"]
        );
        assert_eq!(cost(&r, "tracing_cost"), &Value::Null);
        assert_ne!(cost(&r, "tracing_cost_s3l"), &Value::Null);
        assert_eq!(
            r.notes,
            [
                "s3l round 1 edge-traced: 998 trace records for 1000 streams ended with [DONE] \
              (every call should have one)"
            ]
        );
    }
}
