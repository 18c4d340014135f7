//! Upstream credential choice. One function decides which key a request uses, so the key-pool
//! work (cooldowns, strategies) replaces its body without touching callers.

use crate::config::schema::UpstreamKind;
use crate::config::UpstreamKey;
use http::HeaderValue;
use std::sync::atomic::{AtomicUsize, Ordering};

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
}

/// The keys of one upstream.
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<PooledKey>,
    next: AtomicUsize,
}

impl KeyPool {
    /// Builds header values for every key; keys with bytes invalid in a header are skipped
    /// (config validation already refuses control characters).
    pub fn new(kind: UpstreamKind, keys: &[UpstreamKey]) -> Self {
        let keys = keys
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
                Some(PooledKey {
                    id: k.id.clone(),
                    masked: k.secret.masked(),
                    header,
                    value,
                })
            })
            .collect();
        Self {
            keys,
            next: AtomicUsize::new(0),
        }
    }

    /// The key for the next request (round robin), or `None` when the upstream has no keys.
    pub fn pick(&self) -> Option<&PooledKey> {
        if self.keys.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.keys.len();
        self.keys.get(i)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the upstream has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secret::Secret;

    fn key(id: &str, s: &str) -> UpstreamKey {
        UpstreamKey {
            id: id.into(),
            secret: Secret::new(s.into()),
        }
    }

    #[test]
    fn header_follows_the_kind() {
        let keys = [key("a", "sk-aaaaaaaaaaaa")];
        let p = KeyPool::new(UpstreamKind::Openai, &keys);
        let k = p.pick().unwrap();
        assert_eq!(k.header, http::header::AUTHORIZATION);
        assert_eq!(k.value, "Bearer sk-aaaaaaaaaaaa");
        assert!(k.value.is_sensitive());
        let p = KeyPool::new(UpstreamKind::Anthropic, &keys);
        assert_eq!(p.pick().unwrap().header, "x-api-key");
        assert_eq!(p.pick().unwrap().value, "sk-aaaaaaaaaaaa");
    }

    #[test]
    fn round_robin_over_keys() {
        let keys = [key("a", "1"), key("b", "2")];
        let p = KeyPool::new(UpstreamKind::Vllm, &keys);
        let ids: Vec<_> = (0..4).map(|_| p.pick().unwrap().id.clone()).collect();
        assert_eq!(ids, ["a", "b", "a", "b"]);
        assert!(KeyPool::new(UpstreamKind::Vllm, &[]).pick().is_none());
    }
}
