//! Client authentication: `Authorization: Bearer <k>` or `x-api-key: <k>`, compared by SHA-256.

use crate::config::edge::{AuthSettings, ClientKey};
use crate::error::EdgeError;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use subtle::ConstantTimeEq;

/// The keys of one config snapshot, indexed by the SHA-256 of the secret.
pub struct Authenticator {
    open: bool,
    keys: Vec<ClientKey>,
    by_hash: HashMap<[u8; 32], usize>,
}

impl Authenticator {
    /// Indexes the configured keys.
    pub fn new(cfg: &AuthSettings) -> Self {
        let by_hash = cfg
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.sha256, i))
            .collect();
        Self {
            open: cfg.open,
            keys: cfg.keys.clone(),
            by_hash,
        }
    }

    /// Whether every client is accepted without a key.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The key the request presents, `Ok(None)` in open mode, or a 401.
    ///
    /// Only the SHA-256 of the presented key is looked up: the map's timing can at most tell
    /// an attacker something about the hash of their own guess, never about a stored key; the
    /// final comparison is constant-time anyway.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Option<&ClientKey>, EdgeError> {
        if self.open {
            return Ok(None);
        }
        let Some(presented) = presented_key(headers) else {
            return Err(EdgeError::Unauthorized(
                "missing API key: send Authorization: Bearer <key> or x-api-key: <key>".into(),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        match self.by_hash.get(&digest).map(|&i| &self.keys[i]) {
            Some(k) if bool::from(k.sha256.ct_eq(&digest)) => Ok(Some(k)),
            _ => Err(EdgeError::Unauthorized("invalid API key".into())),
        }
    }
}

/// Checks a key's model allow-list (403 when the model is not on it; `None`: all allowed).
pub fn check_model_of(allowed: Option<&[String]>, model: &str) -> Result<(), EdgeError> {
    match allowed {
        Some(models) if !models.iter().any(|m| m == model) => Err(EdgeError::Forbidden(format!(
            "this API key may not use model {model:?}"
        ))),
        _ => Ok(()),
    }
}

/// The key bytes from `Authorization: Bearer` (scheme case-insensitive) or `x-api-key`.
fn presented_key(headers: &http::HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            let k = b[7..].trim_ascii();
            if !k.is_empty() {
                return Some(k);
            }
        }
    }
    headers
        .get("x-api-key")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::edge::RateLimit;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthSettings {
            open: false,
            keys: vec![ClientKey {
                id: "alice".into(),
                sha256: Sha256::digest(b"alice-key-123").into(),
                models: Some(vec!["qwen".into()]),
                rate_limit: RateLimit::default(),
            }],
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_and_x_api_key_are_equivalent() {
        let a = auth();
        for h in [
            headers(&[("authorization", "Bearer alice-key-123")]),
            headers(&[("authorization", "bearer  alice-key-123 ")]),
            headers(&[("x-api-key", "alice-key-123")]),
        ] {
            assert_eq!(a.authenticate(&h).unwrap().unwrap().id, "alice");
        }
    }

    #[test]
    fn missing_or_wrong_keys_are_401() {
        let a = auth();
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer nope")]),
            headers(&[("authorization", "Basic YWxpY2U6eA==")]),
            headers(&[("x-api-key", "")]),
        ] {
            assert!(matches!(
                a.authenticate(&h),
                Err(EdgeError::Unauthorized(_))
            ));
        }
    }

    #[test]
    fn model_allow_list() {
        let a = auth();
        let k = a
            .authenticate(&headers(&[("x-api-key", "alice-key-123")]))
            .unwrap();
        let allowed = k.and_then(|k| k.models.as_deref());
        assert!(check_model_of(allowed, "qwen").is_ok());
        assert!(matches!(
            check_model_of(allowed, "gpt"),
            Err(EdgeError::Forbidden(_))
        ));
        assert!(check_model_of(None, "gpt").is_ok());
    }
}
