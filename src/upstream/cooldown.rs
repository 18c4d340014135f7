//! How long a rate-limited key rests: the upstream's hint when it gives one (`Retry-After`
//! seconds or HTTP date, `x-ratelimit-reset-*`, a retry hint in the JSON error body), else an
//! escalating default.

use std::time::{Duration, SystemTime};

/// The escalating default when the upstream gives no hint: 5 s, 30 s, 60 s, 120 s, then 300 s.
pub fn default_cooldown(strikes: u32) -> Duration {
    Duration::from_secs(match strikes {
        0 | 1 => 5,
        2 => 30,
        3 => 60,
        4 => 120,
        _ => 300,
    })
}

/// Parses Go-style durations as OpenAI sends them (`1s`, `6m0s`, `20ms`, `1.5s`, `1h2m`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        total += match unit {
            "h" => n * 3600.0,
            "m" => n * 60.0,
            "s" | "" => n,
            "ms" => n / 1000.0,
            "us" | "µs" => n / 1e6,
            "ns" => n / 1e9,
            _ => return None,
        };
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// `Retry-After`: seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The retry hint in a response, if any: headers first, then the body.
pub fn hint(headers: &http::HeaderMap, body: &[u8], now: SystemTime) -> Option<Duration> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(d) = h("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(d);
    }
    if let Some(ms) = h("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let resets: Vec<Duration> = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|n| h(n).and_then(parse_go_duration))
        .collect();
    if let Some(max) = resets.into_iter().max() {
        return Some(max);
    }
    body_hint(body)
}

/// Retry hints in JSON error bodies: Google's `"retryDelay": "30s"`, OpenAI's
/// "Please try again in 1.5s" / "in 20ms".
pub fn body_hint(body: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(body).ok()?;
    if let Some(i) = text.find("\"retryDelay\"") {
        let after = &text[i + "\"retryDelay\"".len()..];
        let start = after.find('"')? + 1;
        let end = after[start..].find('"')? + start;
        if let Some(d) = parse_go_duration(&after[start..end]) {
            return Some(d);
        }
    }
    let lower = text.to_ascii_lowercase();
    let i = lower.find("try again in ")?;
    let after = &text[i + "try again in ".len()..];
    let end = after
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .unwrap_or(after.len());
    let token = after[..end].trim_end_matches('.');
    parse_go_duration(token).or_else(|| {
        // "try again in 20 seconds"
        let secs: f64 = token.parse().ok()?;
        Some(Duration::from_secs_f64(secs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn hints_in_headers_and_bodies() {
        let now = SystemTime::now();
        let mut h = http::HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(hint(&h, b"", now), Some(Duration::from_secs(360)));
        let body =
            br#"{"error":{"message":"Rate limit reached. Please try again in 1.5s. Visit ..."}}"#;
        assert_eq!(
            hint(&http::HeaderMap::new(), body, now),
            Some(Duration::from_millis(1500))
        );
        let google = br#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#;
        assert_eq!(body_hint(google), Some(Duration::from_secs(30)));
        assert_eq!(hint(&http::HeaderMap::new(), b"{}", now), None);
    }

    #[test]
    fn default_escalates_and_caps() {
        let seq: Vec<u64> = (1..=7).map(|s| default_cooldown(s).as_secs()).collect();
        assert_eq!(seq, [5, 30, 60, 120, 300, 300, 300]);
    }
}
