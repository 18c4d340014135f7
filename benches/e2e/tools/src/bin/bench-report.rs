//! `bench-report`: turns the raw measurements of `run.sh` into the results table and JSON.
//!
//! Input (`--raw FILE`): one JSON object per line and measurement:
//! `{"round":1,"scenario":"s1","target":"nginx","load":{…},"proxy":{"cpu_ns":N,"cpu_ticks":N,
//! "rss_kb":N,"alive":true}}` where `load` is the `wrk` summary (S1, S2) or the `bench-sse` report (S3–S5)
//! and `proxy` is null for the direct target. Every figure is computed per round, then the median
//! over rounds is taken; "extra" figures of S4 are differences to the direct target of the same
//! round. Prints the table on stdout and writes `{meta, summary, raw}` to `--out`.
//!
//! Usage: `bench-report --raw raw.jsonl --clk-tck 100 --meta meta.json --out results.json`

use llm_edge_e2e_tools::Flags;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Target names in table order; ratios are to `nginx`. `pingora-min` (the Pingora floor) sits
/// next to nginx so llm-edge's columns read as that floor plus llm-edge's own cost.
const TARGETS: [&str; 5] = ["direct", "nginx", "pingora-min", "edge-api", "edge-pass"];
const BASELINE: &str = "nginx";

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
        "s3" => vec![
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

const SCENARIOS: [(&str, &str); 5] = [
    ("s1", "S1 non-stream, ~300 B body"),
    ("s2", "S2 non-stream, ~100 KB body"),
    ("s3", "S3 streams, 20 chunks, no delay"),
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

    let mut summary = Map::new();
    let mut table = String::new();
    let mut notes: Vec<String> = Vec::new();
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
            let mut per_target: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
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
            let combined: BTreeMap<&str, f64> = per_target
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
        }
    }
    print!("{table}");
    if notes.is_empty() {
        println!("no failures");
    } else {
        println!("problems:");
        for n in &notes {
            println!("  {n}");
        }
    }
    if let Some(out) = flags.get("out") {
        let raw_values: Vec<Value> = raw_text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let doc = json!({
            "meta": meta,
            "summary": summary,
            "problems": notes,
            "raw": raw_values,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(out, text + "\n").map_err(|e| format!("writing {out}: {e}"))?;
    }
    if notes.is_empty() {
        Ok(())
    } else {
        // Still a complete report; the exit status tells scripts something failed.
        std::process::exit(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
