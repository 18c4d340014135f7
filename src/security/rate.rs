//! Per-client-key limits: requests per minute (GCRA), tokens per minute (from observed usage)
//! and requests in flight. State lives for the process and is looked up by key id, so a reload
//! keeps what a key has used; each check is a few atomic operations, with no sweeper.

use crate::config::edge::RateLimit;
use crate::error::EdgeError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const MINUTE_NS: u64 = 60_000_000_000;

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // Offset by a minute so "empty bucket" (0) is always in the past.
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + MINUTE_NS
}

/// Usage state of one client key.
#[derive(Default)]
pub struct KeyUsage {
    /// GCRA theoretical arrival time of the next request (ns).
    rpm_tat: AtomicU64,
    /// Same idea for tokens: every token pushes it by 60 s / tpm.
    tpm_tat: AtomicU64,
    in_flight: AtomicU32,
}

/// Every client key's usage state, by id; shared across config reloads.
#[derive(Default)]
pub struct ClientUsage {
    by_id: Mutex<HashMap<String, Arc<KeyUsage>>>,
}

impl ClientUsage {
    /// The state of key `id` (created on first use; the lock is taken once per key per
    /// snapshot build, not per request).
    pub fn state(&self, id: &str) -> Arc<KeyUsage> {
        let mut m = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }
}

/// Holds one in-flight slot until dropped.
pub struct InFlight(Arc<KeyUsage>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a successful check leaves: the slot (if `concurrent` is set) and the headers to send.
pub struct Admitted {
    /// Released when the request ends.
    pub slot: Option<InFlight>,
    /// `x-ratelimit-*` headers for the response.
    pub headers: Vec<(&'static str, String)>,
}

/// Checks and charges one request against `limit`. Order: tokens (nothing charged when over),
/// then requests per minute, then concurrency (an RPM charge is refunded when the concurrency
/// check fails, so a refused request costs nothing).
pub fn admit(state: &Arc<KeyUsage>, limit: &RateLimit) -> Result<Admitted, EdgeError> {
    let now = now_ns();
    let mut headers = Vec::new();
    if let Some(tpm) = limit.tpm {
        let tat = state.tpm_tat.load(Ordering::Acquire).max(now);
        let ahead = tat - now;
        if ahead > MINUTE_NS {
            return Err(over(
                ahead - MINUTE_NS,
                format!("tokens per minute limit ({tpm}) reached for this API key"),
            ));
        }
        let per_token = MINUTE_NS / tpm.max(1);
        let remaining = (MINUTE_NS - ahead) / per_token.max(1);
        headers.push(("x-ratelimit-limit-tokens", tpm.to_string()));
        headers.push((
            "x-ratelimit-remaining-tokens",
            remaining.min(tpm).to_string(),
        ));
        headers.push(("x-ratelimit-reset-tokens", reset_text(ahead)));
    }
    let mut rpm_charged = None;
    if let Some(rpm) = limit.rpm {
        let t = MINUTE_NS / u64::from(rpm.max(1));
        let tolerance = MINUTE_NS - t;
        let mut cur = state.rpm_tat.load(Ordering::Acquire);
        let new_tat = loop {
            let tat = cur.max(now);
            if tat - now > tolerance {
                return Err(over(
                    tat - now - tolerance,
                    format!("requests per minute limit ({rpm}) reached for this API key"),
                ));
            }
            match state.rpm_tat.compare_exchange_weak(
                cur,
                tat + t,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break tat + t,
                Err(actual) => cur = actual,
            }
        };
        rpm_charged = Some(t);
        let used = new_tat - now;
        let remaining = (MINUTE_NS - used.min(MINUTE_NS)) / t;
        headers.push(("x-ratelimit-limit-requests", rpm.to_string()));
        headers.push(("x-ratelimit-remaining-requests", remaining.to_string()));
        headers.push(("x-ratelimit-reset-requests", reset_text(used)));
    }
    let slot = match limit.concurrent {
        Some(max) => {
            let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= max {
                state.in_flight.fetch_sub(1, Ordering::AcqRel);
                if let Some(t) = rpm_charged {
                    state.rpm_tat.fetch_sub(t, Ordering::AcqRel);
                }
                return Err(EdgeError::ClientRateLimited {
                    retry_after: 1,
                    why: format!("concurrent requests limit ({max}) reached for this API key"),
                });
            }
            Some(InFlight(state.clone()))
        }
        None => None,
    };
    Ok(Admitted { slot, headers })
}

/// Charges observed tokens to the key (after the response).
pub fn charge_tokens(state: &KeyUsage, limit: &RateLimit, tokens: u64) {
    let Some(tpm) = limit.tpm else { return };
    if tokens == 0 {
        return;
    }
    let per_token = MINUTE_NS / tpm.max(1);
    let add = tokens.saturating_mul(per_token);
    let now = now_ns();
    let mut cur = state.tpm_tat.load(Ordering::Acquire);
    loop {
        let next = cur.max(now).saturating_add(add);
        match state
            .tpm_tat
            .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

fn over(wait_ns: u64, why: String) -> EdgeError {
    EdgeError::ClientRateLimited {
        retry_after: Duration::from_nanos(wait_ns).as_secs_f64().ceil().max(1.0) as u64,
        why,
    }
}

/// OpenAI's reset notation: `1s`, `6m0s`, `20ms`.
fn reset_text(ns: u64) -> String {
    let ms = ns / 1_000_000;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    if s < 60 {
        return format!("{s}s");
    }
    format!("{}m{}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rpm: Option<u32>, tpm: Option<u64>, concurrent: Option<u32>) -> RateLimit {
        RateLimit {
            rpm,
            tpm,
            concurrent,
        }
    }

    #[test]
    fn rpm_allows_a_minute_of_burst_then_refuses() {
        let s = Arc::new(KeyUsage::default());
        let l = limit(Some(3), None, None);
        for left in [2, 1, 0] {
            let a = admit(&s, &l).unwrap();
            let rem = a
                .headers
                .iter()
                .find(|(k, _)| *k == "x-ratelimit-remaining-requests")
                .unwrap();
            assert_eq!(rem.1, left.to_string());
        }
        match admit(&s, &l) {
            Err(EdgeError::ClientRateLimited { retry_after, .. }) => {
                assert!((1..=20).contains(&retry_after), "{retry_after}")
            }
            other => panic!("{:?}", other.map(|a| a.headers)),
        }
    }

    #[test]
    fn concurrency_slot_is_released_on_drop_and_refusal_refunds_rpm() {
        let s = Arc::new(KeyUsage::default());
        let l = limit(Some(2), None, Some(1));
        let held = admit(&s, &l).unwrap();
        assert!(admit(&s, &l).is_err());
        drop(held);
        // The refused request did not use up the second request of the minute.
        assert!(admit(&s, &l).is_ok());
    }

    #[test]
    fn tokens_over_the_minute_refuse_until_the_window_frees() {
        let s = Arc::new(KeyUsage::default());
        let l = limit(None, Some(1000), None);
        assert!(admit(&s, &l).is_ok());
        charge_tokens(&s, &l, 600);
        assert!(admit(&s, &l).is_ok());
        charge_tokens(&s, &l, 600);
        match admit(&s, &l) {
            Err(EdgeError::ClientRateLimited { retry_after, why }) => {
                assert!(why.contains("tokens"), "{why}");
                // 1200 tokens at 1000/min: 12 s over the window.
                assert!((11..=13).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{:?}", other.map(|a| a.headers)),
        }
    }

    #[test]
    fn reset_notation() {
        assert_eq!(reset_text(20_000_000), "20ms");
        assert_eq!(reset_text(1_500_000_000), "1s");
        assert_eq!(reset_text(360_000_000_000), "6m0s");
    }
}
