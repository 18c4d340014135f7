//! Upstream key pools: selection by strategy, per-(key, model) cooldowns after 429s, dead keys
//! after 401/402/403, concurrency caps. State is shared by every request of the process.

use super::cooldown;
use crate::config::schema::{KeyStrategy, UpstreamKind};
use crate::config::UpstreamKey;
use http::HeaderValue;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug, Default, Clone, Copy)]
struct Cool {
    until_ms: u64,
    strikes: u32,
}

/// Mutable state of one key, shared by all requests (and kept across reloads by key id).
#[derive(Debug, Default)]
pub struct KeyState {
    in_flight: AtomicU32,
    /// Key-wide cooldown end (monotonic ms).
    cool_until_ms: AtomicU64,
    /// Per-model cooldowns.
    models: Mutex<HashMap<String, Cool>>,
    dead: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl KeyState {
    /// Requests in flight on this key.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the key was marked dead (401/402/403).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Last error class seen on this key.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Remaining cooldown for `model` (the longer of key-wide and per-model).
    pub fn cooldown_left(&self, model: Option<&str>) -> Duration {
        let now = now_ms();
        let mut until = self.cool_until_ms.load(Ordering::Relaxed);
        if let (Some(m), Ok(map)) = (model, self.models.lock()) {
            if let Some(c) = map.get(m) {
                until = until.max(c.until_ms);
            }
        }
        Duration::from_millis(until.saturating_sub(now))
    }

    /// Longest remaining cooldown over all models.
    pub fn max_cooldown_left(&self) -> Duration {
        let now = now_ms();
        let mut until = self.cool_until_ms.load(Ordering::Relaxed);
        if let Ok(map) = self.models.lock() {
            for c in map.values() {
                until = until.max(c.until_ms);
            }
        }
        Duration::from_millis(until.saturating_sub(now))
    }

    fn set_error(&self, class: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(class.to_string());
        }
    }
}

/// A key with its header value built at load time.
#[derive(Debug)]
pub struct PooledKey {
    /// Id shown in logs and metrics.
    pub id: String,
    /// Masked form for admin output.
    pub masked: String,
    /// Header name the kind expects.
    pub header: http::HeaderName,
    /// Ready-to-send header value (marked sensitive).
    pub value: HeaderValue,
    /// Relative share of traffic.
    pub weight: u32,
    /// Concurrency cap.
    pub max_concurrent: Option<u32>,
    /// Models allowed (`None`: all).
    pub models: Option<Vec<String>>,
    /// Shared state.
    pub state: Arc<KeyState>,
}

impl PooledKey {
    fn serves(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// Identity of a key across reloads: its id and a digest of its secret (never the secret).
fn carry_key(id: &str, value: &HeaderValue) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(value.as_bytes());
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{id}/{hex}")
}

/// Outcome of a key selection.
#[derive(Debug)]
pub enum Pick<'a> {
    /// Use this key; the lease counts it in flight until dropped.
    Key(KeyLease<'a>),
    /// The upstream has no keys: send no credential.
    NoKeys,
    /// Keys exist but all usable ones are at their concurrency cap: wait for a release.
    Busy,
    /// Every key is cooling down (`Some`: the earliest recovery) or dead (`None`).
    Exhausted(Option<Duration>),
}

/// A key in use; dropping it releases the in-flight slot.
#[derive(Debug)]
pub struct KeyLease<'a> {
    pool: &'a KeyPool,
    /// Index of the key in the pool.
    pub index: usize,
}

impl<'a> KeyLease<'a> {
    /// The key.
    pub fn key(&self) -> &'a PooledKey {
        &self.pool.keys[self.index]
    }
}

impl Drop for KeyLease<'_> {
    fn drop(&mut self) {
        let k = &self.pool.keys[self.index];
        k.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        if k.max_concurrent.is_some() {
            self.pool.released.notify_waiters();
        }
    }
}

/// The keys of one upstream.
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<PooledKey>,
    strategy: KeyStrategy,
    /// Weighted round-robin schedule of key indices.
    schedule: Vec<usize>,
    next: AtomicUsize,
    sticky: AtomicUsize,
    max_cooldown: Duration,
    released: Notify,
}

impl KeyPool {
    /// Builds header values for every key. `states` carries state over from a previous pool
    /// (reload) for keys whose id is unchanged.
    pub fn new(
        kind: UpstreamKind,
        keys: &[UpstreamKey],
        strategy: KeyStrategy,
        max_cooldown: Duration,
        states: &HashMap<String, Arc<KeyState>>,
    ) -> Self {
        let keys: Vec<PooledKey> = keys
            .iter()
            .filter_map(|k| {
                let (header, raw) = match kind {
                    UpstreamKind::Anthropic => (
                        http::HeaderName::from_static("x-api-key"),
                        k.secret.expose().to_string(),
                    ),
                    UpstreamKind::Openai | UpstreamKind::Vllm => (
                        http::header::AUTHORIZATION,
                        format!("Bearer {}", k.secret.expose()),
                    ),
                };
                let mut value = HeaderValue::from_str(&raw).ok()?;
                value.set_sensitive(true);
                let state = states
                    .get(&carry_key(&k.id, &value))
                    .cloned()
                    .unwrap_or_default();
                Some(PooledKey {
                    state,
                    id: k.id.clone(),
                    masked: k.secret.masked(),
                    header,
                    value,
                    weight: k.weight.max(1),
                    max_concurrent: k.max_concurrent,
                    models: k.models.clone(),
                })
            })
            .collect();
        let schedule = smooth_weighted_schedule(&keys.iter().map(|k| k.weight).collect::<Vec<_>>());
        Self {
            keys,
            strategy,
            schedule,
            next: AtomicUsize::new(0),
            sticky: AtomicUsize::new(0),
            max_cooldown,
            released: Notify::new(),
        }
    }

    /// A pool with the default strategy and no carried-over state.
    pub fn simple(kind: UpstreamKind, keys: &[UpstreamKey]) -> Self {
        Self::new(
            kind,
            keys,
            KeyStrategy::RoundRobin,
            Duration::from_secs(300),
            &HashMap::new(),
        )
    }

    /// The keys.
    pub fn keys(&self) -> &[PooledKey] {
        &self.keys
    }

    /// Key states to carry over on reload, for keys whose id and secret are unchanged (a
    /// rotated secret starts afresh even under the same id).
    pub fn states(&self) -> HashMap<String, Arc<KeyState>> {
        self.keys
            .iter()
            .map(|k| (carry_key(&k.id, &k.value), k.state.clone()))
            .collect()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the upstream has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for the next request without a model or session (pass-through routes).
    pub fn pick(&self) -> Option<&PooledKey> {
        match self.select("", None, &[]) {
            Pick::Key(lease) => {
                let k = lease.key();
                // Pass-through requests are not tracked in flight.
                drop(lease);
                Some(k)
            }
            _ => None,
        }
    }

    fn usable(&self, i: usize, model: &str, now: u64, exclude: &[usize]) -> Usable {
        let k = &self.keys[i];
        if exclude.contains(&i) || k.state.is_dead() || !k.serves(model) {
            return Usable::No;
        }
        let mut until = k.state.cool_until_ms.load(Ordering::Relaxed);
        if !model.is_empty() {
            if let Ok(map) = k.state.models.lock() {
                if let Some(c) = map.get(model) {
                    until = until.max(c.until_ms);
                }
            }
        }
        if until > now {
            return Usable::Cooling(until - now);
        }
        if k.max_concurrent.is_some_and(|m| k.state.in_flight() >= m) {
            return Usable::Busy;
        }
        Usable::Yes
    }

    /// Whether a key other than `exclude` could take a request for `model` now or once a
    /// concurrency slot frees (busy counts as available). Does not change any state.
    pub fn has_eligible(&self, model: &str, exclude: &[usize]) -> bool {
        let now = now_ms();
        (0..self.keys.len()).any(|i| {
            matches!(
                self.usable(i, model, now, exclude),
                Usable::Yes | Usable::Busy
            )
        })
    }

    /// Chooses a key for `model`, skipping `exclude` (keys already tried by this request).
    /// Hot: a few atomic loads per key looked at.
    pub fn select(&self, model: &str, session: Option<&[u8]>, exclude: &[usize]) -> Pick<'_> {
        if self.keys.is_empty() {
            return Pick::NoKeys;
        }
        let now = now_ms();
        let n = self.keys.len();
        let mut busy = false;
        let mut earliest: Option<u64> = None;
        let mut note = |u: Usable| match u {
            Usable::Busy => busy = true,
            Usable::Cooling(ms) => earliest = Some(earliest.map_or(ms, |e: u64| e.min(ms))),
            _ => {}
        };
        let chosen = match (self.strategy, session) {
            (KeyStrategy::Session, Some(s)) => {
                // Rendezvous hashing: the session keeps its key while that key is usable.
                let mut best: Option<(u64, usize)> = None;
                for i in 0..n {
                    match self.usable(i, model, now, exclude) {
                        Usable::Yes => {
                            let score = rendezvous(s, i, self.keys[i].weight);
                            if best.is_none_or(|(b, _)| score > b) {
                                best = Some((score, i));
                            }
                        }
                        u => note(u),
                    }
                }
                best.map(|(_, i)| i)
            }
            (KeyStrategy::LeastBusy, _) => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<(u32, u32, usize)> = None;
                for off in 0..n {
                    let i = (start + off) % n;
                    match self.usable(i, model, now, exclude) {
                        Usable::Yes => {
                            let load = self.keys[i].state.in_flight();
                            let w = self.keys[i].weight;
                            let better = match best {
                                None => true,
                                // Fewer in flight per unit of weight wins; then higher weight.
                                Some((bl, bw, _)) => {
                                    (load as u64) * (bw as u64) < (bl as u64) * (w as u64)
                                        || (load as u64 * bw as u64 == bl as u64 * w as u64
                                            && w > bw)
                                }
                            };
                            if better {
                                best = Some((load, w, i));
                            }
                        }
                        u => note(u),
                    }
                }
                best.map(|(_, _, i)| i)
            }
            (KeyStrategy::Sequential, _) => {
                let start = self.sticky.load(Ordering::Relaxed) % n;
                let mut found = None;
                for off in 0..n {
                    let i = (start + off) % n;
                    match self.usable(i, model, now, exclude) {
                        Usable::Yes => {
                            found = Some(i);
                            break;
                        }
                        u => note(u),
                    }
                }
                if let Some(i) = found {
                    if i != start {
                        self.sticky.store(i, Ordering::Relaxed);
                    }
                }
                found
            }
            _ => {
                let len = self.schedule.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut found = None;
                for off in 0..len {
                    let i = self.schedule[(start + off) % len];
                    match self.usable(i, model, now, exclude) {
                        Usable::Yes => {
                            found = Some(i);
                            break;
                        }
                        u => note(u),
                    }
                }
                found
            }
        };
        match chosen {
            Some(i) if self.try_acquire(i) => Pick::Key(KeyLease {
                pool: self,
                index: i,
            }),
            // Another request took the last slot between the check and the claim.
            Some(_) => Pick::Busy,
            None if busy => Pick::Busy,
            None => Pick::Exhausted(earliest.map(Duration::from_millis)),
        }
    }

    /// Claims an in-flight slot on key `i`, atomically respecting its `max_concurrent`.
    fn try_acquire(&self, i: usize) -> bool {
        let k = &self.keys[i];
        match k.max_concurrent {
            None => {
                k.state.in_flight.fetch_add(1, Ordering::AcqRel);
                true
            }
            Some(max) => k
                .state
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    (v < max).then_some(v + 1)
                })
                .is_ok(),
        }
    }

    /// Waits until some key releases a slot (or `timeout`).
    pub async fn wait_for_release(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.released.notified()).await;
    }

    /// A success on (key, model): its strikes are forgiven.
    pub fn on_success(&self, index: usize, model: &str) {
        let s = &self.keys[index].state;
        if let Ok(mut map) = s.models.lock() {
            if let Some(c) = map.get_mut(model) {
                c.strikes = 0;
            }
        }
    }

    /// A 429 on (key, model): cools it down for `hint` or the escalating default (capped),
    /// and returns the cooldown.
    pub fn on_rate_limited(&self, index: usize, model: &str, hint: Option<Duration>) -> Duration {
        let s = &self.keys[index].state;
        s.set_error("rate_limited");
        let now = now_ms();
        let Ok(mut map) = s.models.lock() else {
            return Duration::ZERO;
        };
        let c = map.entry(model.to_string()).or_default();
        c.strikes = c.strikes.saturating_add(1);
        let d = hint
            .unwrap_or_else(|| cooldown::default_cooldown(c.strikes))
            .min(self.max_cooldown);
        c.until_ms = now + d.as_millis() as u64;
        d
    }

    /// A 401/402/403: the key is dead until reload or reset. Returns true the first time.
    pub fn on_auth_failure(&self, index: usize, status: u16) -> bool {
        let s = &self.keys[index].state;
        s.set_error(match status {
            402 => "payment_required",
            403 => "forbidden",
            _ => "unauthorized",
        });
        !s.dead.swap(true, Ordering::AcqRel)
    }

    /// Records another failure class (5xx, connect) without cooling the key.
    pub fn on_error(&self, index: usize, class: &str) {
        self.keys[index].state.set_error(class);
    }

    /// Admin reset: alive again, cooldowns cleared. Returns false for an unknown id.
    pub fn reset(&self, id: &str) -> bool {
        let Some(k) = self.keys.iter().find(|k| k.id == id) else {
            return false;
        };
        k.state.dead.store(false, Ordering::Release);
        k.state.cool_until_ms.store(0, Ordering::Relaxed);
        if let Ok(mut m) = k.state.models.lock() {
            m.clear();
        }
        if let Ok(mut e) = k.state.last_error.lock() {
            *e = None;
        }
        true
    }
}

enum Usable {
    Yes,
    No,
    Busy,
    Cooling(u64),
}

fn rendezvous(session: &[u8], index: usize, weight: u32) -> u64 {
    let mut h = DefaultHasher::new();
    session.hash(&mut h);
    index.hash(&mut h);
    let x = h.finish();
    // Weight by taking the max of `weight` draws, cheap and monotone in weight.
    (1..weight.min(16)).fold(x, |acc, w| {
        let mut h = DefaultHasher::new();
        x.hash(&mut h);
        w.hash(&mut h);
        acc.max(h.finish())
    })
}

/// Nginx-style smooth weighted round robin, unrolled into a schedule.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total.min(10_000) {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, s: &str) -> UpstreamKey {
        UpstreamKey::new(id, s)
    }

    fn pool(strategy: KeyStrategy, keys: &[UpstreamKey]) -> KeyPool {
        KeyPool::new(
            UpstreamKind::Openai,
            keys,
            strategy,
            Duration::from_secs(300),
            &HashMap::new(),
        )
    }

    fn pick_id(p: &KeyPool, model: &str) -> String {
        match p.select(model, None, &[]) {
            Pick::Key(l) => l.key().id.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_follows_the_kind() {
        let keys = [key("a", "sk-aaaaaaaaaaaa")];
        let p = KeyPool::simple(UpstreamKind::Openai, &keys);
        let k = p.pick().unwrap();
        assert_eq!(k.header, http::header::AUTHORIZATION);
        assert_eq!(k.value, "Bearer sk-aaaaaaaaaaaa");
        assert!(k.value.is_sensitive());
        let p = KeyPool::simple(UpstreamKind::Anthropic, &keys);
        assert_eq!(p.pick().unwrap().header, "x-api-key");
        assert_eq!(p.pick().unwrap().value, "sk-aaaaaaaaaaaa");
        // API calls take the client's headers once per call, with credentials left out, so a
        // client header of a key's name can never reach the upstream beside the key.
        for kind in [
            UpstreamKind::Openai,
            UpstreamKind::Vllm,
            UpstreamKind::Anthropic,
        ] {
            let p = KeyPool::simple(kind, &keys);
            let name = p.pick().unwrap().header.clone();
            assert!(crate::proxy::headers::CLIENT_CREDENTIALS.contains(&name.as_str()));
        }
    }

    #[test]
    fn round_robin_is_even_and_weighted() {
        let p = pool(
            KeyStrategy::RoundRobin,
            &[key("a", "1"), key("b", "2"), key("c", "3")],
        );
        let mut counts = HashMap::new();
        for _ in 0..300 {
            *counts.entry(pick_id(&p, "m")).or_insert(0) += 1;
        }
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [100, 100, 100]
        );
        let mut b = key("b", "2");
        b.weight = 2;
        let p = pool(KeyStrategy::RoundRobin, &[key("a", "1"), b]);
        let ids: Vec<String> = (0..6).map(|_| pick_id(&p, "m")).collect();
        assert_eq!(ids.iter().filter(|i| *i == "b").count(), 4);
        assert!(KeyPool::simple(UpstreamKind::Vllm, &[]).pick().is_none());
    }

    #[test]
    fn cooling_key_is_skipped_per_model_until_it_recovers() {
        let p = pool(KeyStrategy::RoundRobin, &[key("a", "1"), key("b", "2")]);
        p.on_rate_limited(0, "m", Some(Duration::from_millis(50)));
        for _ in 0..4 {
            assert_eq!(pick_id(&p, "m"), "b");
        }
        // Another model is not affected.
        let ids: Vec<String> = (0..2).map(|_| pick_id(&p, "other")).collect();
        assert!(ids.contains(&"a".to_string()));
        std::thread::sleep(Duration::from_millis(60));
        let ids: Vec<String> = (0..2).map(|_| pick_id(&p, "m")).collect();
        assert!(ids.contains(&"a".to_string()));
    }

    #[test]
    fn all_cooling_reports_the_earliest_recovery_and_all_dead_none() {
        let p = pool(KeyStrategy::RoundRobin, &[key("a", "1"), key("b", "2")]);
        p.on_rate_limited(0, "m", Some(Duration::from_secs(10)));
        p.on_rate_limited(1, "m", Some(Duration::from_secs(3)));
        match p.select("m", None, &[]) {
            Pick::Exhausted(Some(d)) => {
                assert!(d <= Duration::from_secs(3) && d > Duration::from_secs(2))
            }
            other => panic!("{other:?}"),
        }
        assert!(p.on_auth_failure(0, 401));
        assert!(!p.on_auth_failure(0, 401), "logged once");
        p.on_auth_failure(1, 403);
        assert!(matches!(p.select("m", None, &[]), Pick::Exhausted(None)));
        assert!(p.reset("a"));
        assert_eq!(pick_id(&p, "m"), "a");
    }

    #[test]
    fn escalating_default_cooldown_is_capped() {
        let p = KeyPool::new(
            UpstreamKind::Openai,
            &[key("a", "1")],
            KeyStrategy::RoundRobin,
            Duration::from_secs(60),
            &HashMap::new(),
        );
        let ds: Vec<u64> = (0..5)
            .map(|_| p.on_rate_limited(0, "m", None).as_secs())
            .collect();
        assert_eq!(ds, [5, 30, 60, 60, 60]);
    }

    #[test]
    fn least_busy_and_max_concurrent() {
        let mut a = key("a", "1");
        a.max_concurrent = Some(1);
        let p = pool(KeyStrategy::LeastBusy, &[a, key("b", "2")]);
        let l1 = match p.select("m", None, &[]) {
            Pick::Key(l) => l,
            o => panic!("{o:?}"),
        };
        let first = l1.key().id.clone();
        let l2 = match p.select("m", None, &[]) {
            Pick::Key(l) => l,
            o => panic!("{o:?}"),
        };
        assert_ne!(first, l2.key().id, "the idle key is chosen");
        // a is capped at 1: with a busy, everything goes to b.
        let lease_a = if first == "a" { l1 } else { l2 };
        for _ in 0..5 {
            match p.select("m", None, &[]) {
                Pick::Key(l) => assert_eq!(l.key().id, "b"),
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(lease_a.key().state.in_flight(), 1);
        drop(lease_a);
        assert_eq!(p.keys()[0].state.in_flight(), 0);
        let only_a = {
            let mut a = key("a", "1");
            a.max_concurrent = Some(1);
            pool(KeyStrategy::LeastBusy, &[a])
        };
        let _hold = only_a.select("m", None, &[]);
        assert!(matches!(only_a.select("m", None, &[]), Pick::Busy));
    }

    #[test]
    fn sequential_sticks_until_cooldown() {
        let p = pool(KeyStrategy::Sequential, &[key("a", "1"), key("b", "2")]);
        for _ in 0..5 {
            assert_eq!(pick_id(&p, "m"), "a");
        }
        p.on_rate_limited(0, "m", Some(Duration::from_secs(5)));
        for _ in 0..5 {
            assert_eq!(pick_id(&p, "m"), "b");
        }
    }

    #[test]
    fn session_sticks_to_one_key_and_model_allow_list_applies() {
        let keys: Vec<UpstreamKey> = (0..8)
            .map(|i| key(&format!("k{i}"), &format!("s{i}")))
            .collect();
        let p = pool(KeyStrategy::Session, &keys);
        for s in ["sess-1", "sess-2", "sess-3"] {
            let first = match p.select("m", Some(s.as_bytes()), &[]) {
                Pick::Key(l) => l.key().id.clone(),
                o => panic!("{o:?}"),
            };
            for _ in 0..10 {
                match p.select("m", Some(s.as_bytes()), &[]) {
                    Pick::Key(l) => assert_eq!(l.key().id, first),
                    o => panic!("{o:?}"),
                }
            }
        }
        let mut only = key("x", "9");
        only.models = Some(vec!["gpt".into()]);
        let p = pool(KeyStrategy::RoundRobin, &[only]);
        assert!(matches!(
            p.select("claude", None, &[]),
            Pick::Exhausted(None)
        ));
        assert!(matches!(p.select("gpt", None, &[]), Pick::Key(_)));
    }

    #[test]
    fn excluded_keys_are_not_chosen_again() {
        let p = pool(KeyStrategy::RoundRobin, &[key("a", "1"), key("b", "2")]);
        for _ in 0..4 {
            match p.select("m", None, &[0]) {
                Pick::Key(l) => assert_eq!(l.key().id, "b"),
                o => panic!("{o:?}"),
            }
        }
        assert!(matches!(
            p.select("m", None, &[0, 1]),
            Pick::Exhausted(None)
        ));
    }
}
