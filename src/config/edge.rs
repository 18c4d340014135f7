//! Validation of the edge-facing sections: listeners, client auth, CORS, egress, DNS, admin
//! listener, access log, forwarding trust.

use super::schema::{
    AccessLogFormat, AuthMode, RawAccessLog, RawAdmin, RawAuth, RawCors, RawDns, RawListen,
    RawRateLimit,
};
use super::secret::{self, Secret};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Address and port.
    pub addr: SocketAddr,
    /// TLS certificate and key files, when the listener terminates TLS.
    pub tls: Option<TlsFiles>,
}

/// PEM files of a TLS listener (re-read on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Client authentication.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// No authentication (explicit `auth: {mode: open}`).
    pub open: bool,
    /// Keys, in file order.
    pub keys: Vec<ClientKey>,
}

/// A client key: only its SHA-256 is kept in memory.
#[derive(Debug, Clone)]
pub struct ClientKey {
    /// Name shown in logs, metrics, traces and the ledger.
    pub id: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// Models this key may use (`None`: all).
    pub models: Option<Vec<String>>,
    /// Limits.
    pub rate_limit: RateLimit,
}

/// Per-key limits (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight.
    pub concurrent: Option<u32>,
}

/// CORS policy.
#[derive(Debug, Clone)]
pub struct CorsSettings {
    /// Exact origins (or `*`).
    pub allow_origins: Vec<String>,
    /// `Access-Control-Allow-Methods` value.
    pub allow_methods: String,
    /// `Access-Control-Allow-Headers` value (lowercase names).
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers` value.
    pub expose_headers: String,
    /// Credentials allowed.
    pub allow_credentials: bool,
    /// Preflight cache lifetime.
    pub max_age: Duration,
}

/// Resolver settings.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    /// Nameservers; empty = the system configuration.
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout: Option<Duration>,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address.
    pub listen: SocketAddr,
    /// Bearer key (required when `listen` is not loopback).
    pub key: Option<Secret>,
}

/// Default admin listener address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Access log destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard error.
    Stderr,
    /// A file (appended; reopened on SIGUSR1).
    File(PathBuf),
}

/// Access log settings.
#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    /// Where lines go.
    pub target: AccessLogTarget,
    /// Line format.
    pub format: AccessLogFormat,
    /// Queue capacity in lines.
    pub queue: usize,
}

/// Parses `listen:` entries.
pub fn listeners(raw: &[RawListen], problems: &mut Vec<String>) -> Vec<Listener> {
    if raw.is_empty() {
        problems.push("listen: at least one address is required".to_string());
    }
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let (addr, tls) = match l {
            RawListen::Addr(a) => (a.as_str(), None),
            RawListen::Full(f) => (f.addr.as_str(), f.tls.as_ref()),
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            problems.push(format!(
                "listen[{i}]: {addr:?} is not an IP:port address (e.g. 127.0.0.1:8080)"
            ));
            continue;
        };
        let tls = tls.map(|t| TlsFiles {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
        });
        if let Some(t) = &tls {
            for (what, p) in [("cert", &t.cert), ("key", &t.key)] {
                if let Err(e) = std::fs::metadata(p) {
                    problems.push(format!("listen[{i}].tls.{what}: {}: {e}", p.display()));
                }
            }
        }
        if out.iter().any(|o: &Listener| o.addr == addr) {
            problems.push(format!("listen[{i}]: {addr} is listed twice"));
        }
        out.push(Listener { addr, tls });
    }
    out
}

/// Parses `auth:`; a missing section is an error (open mode must be explicit).
pub fn auth(
    raw: Option<RawAuth>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> AuthSettings {
    let Some(raw) = raw else {
        problems.push(
            "auth: missing; list client keys under auth.keys, or write `auth: {mode: open}` to accept every client"
                .to_string(),
        );
        return AuthSettings::default();
    };
    let mode = raw.mode.unwrap_or(AuthMode::Keys);
    if mode == AuthMode::Open {
        if !raw.keys.is_empty() {
            problems.push("auth: mode open cannot have keys".to_string());
        }
        return AuthSettings {
            open: true,
            keys: Vec::new(),
        };
    }
    if raw.keys.is_empty() {
        problems.push("auth.keys: at least one key is required (or auth: {mode: open})".into());
    }
    let mut keys = Vec::new();
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        let at = format!("auth.keys[{i}]");
        if k.id.is_empty() || k.id.bytes().any(|b| b <= b' ' || b == 0x7f) {
            problems.push(format!("{at}.id: must be non-empty, without spaces"));
        }
        if !ids.insert(k.id.clone()) {
            problems.push(format!("{at}.id: duplicate id {:?}", k.id));
        }
        let sha256 = match (k.key, k.key_sha256) {
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: set key or key_sha256, not both"));
                continue;
            }
            (None, None) => {
                problems.push(format!("{at}: key or key_sha256 is required"));
                continue;
            }
            (Some(raw_key), None) => match secret::resolve(&raw_key, env) {
                Ok(s) if s.len() < 8 => {
                    problems.push(format!("{at}.key: too short (at least 8 characters)"));
                    continue;
                }
                Ok(s) => Sha256::digest(s.as_bytes()).into(),
                Err(why) => {
                    problems.push(format!("{at}.key: {why}"));
                    continue;
                }
            },
            (None, Some(hex)) => match parse_sha256_hex(&hex) {
                Some(h) => h,
                None => {
                    problems.push(format!(
                        "{at}.key_sha256: expected 64 hexadecimal digits (sha256sum of the key)"
                    ));
                    continue;
                }
            },
        };
        if !hashes.insert(sha256) {
            problems.push(format!("{at}: the same key is listed twice"));
        }
        let rate_limit = rate_limit(&at, k.rate_limit.unwrap_or_default(), problems);
        keys.push(ClientKey {
            id: k.id,
            sha256,
            models: k.models,
            rate_limit,
        });
    }
    AuthSettings { open: false, keys }
}

fn rate_limit(at: &str, r: RawRateLimit, problems: &mut Vec<String>) -> RateLimit {
    if r.rpm == Some(0) {
        problems.push(format!("{at}.rate_limit.rpm: must be at least 1"));
    }
    if r.tpm == Some(0) {
        problems.push(format!("{at}.rate_limit.tpm: must be at least 1"));
    }
    if r.concurrent == Some(0) {
        problems.push(format!("{at}.rate_limit.concurrent: must be at least 1"));
    }
    RateLimit {
        rpm: r.rpm,
        tpm: r.tpm,
        concurrent: r.concurrent,
    }
}

fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Headers a browser client of an LLM API sends.
const DEFAULT_CORS_HEADERS: [&str; 7] = [
    "authorization",
    "content-type",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "x-request-id",
];

/// Parses `cors:`.
pub fn cors(raw: Option<RawCors>, problems: &mut Vec<String>) -> Option<CorsSettings> {
    let raw = raw?;
    if raw.allow_origins.is_empty() {
        problems.push("cors.allow_origins: at least one origin is required".to_string());
    }
    for (i, o) in raw.allow_origins.iter().enumerate() {
        if o == "*" {
            if raw.allow_credentials {
                problems.push(format!(
                    "cors.allow_origins[{i}]: \"*\" cannot be used with allow_credentials; list the origins"
                ));
            }
            continue;
        }
        let ok = (o.starts_with("https://") || o.starts_with("http://"))
            && !o.ends_with('/')
            && !o.contains('*')
            && o.parse::<http::Uri>().is_ok_and(|u| u.path() == "/");
        if !ok {
            problems.push(format!(
                "cors.allow_origins[{i}]: {o:?} is not an origin (scheme://host[:port], no path, no wildcard)"
            ));
        }
    }
    let methods = raw
        .allow_methods
        .unwrap_or_else(|| vec!["GET".into(), "POST".into(), "OPTIONS".into()]);
    let headers: Vec<String> = raw
        .allow_headers
        .unwrap_or_else(|| DEFAULT_CORS_HEADERS.iter().map(|h| h.to_string()).collect())
        .into_iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, h) in headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            problems.push(format!(
                "cors.allow_headers[{i}]: {h:?} is not a header name"
            ));
        }
    }
    Some(CorsSettings {
        allow_origins: raw.allow_origins,
        allow_methods: methods.join(", ").to_ascii_uppercase(),
        allow_headers: headers,
        expose_headers: raw
            .expose_headers
            .unwrap_or_else(|| {
                [
                    "x-request-id",
                    "retry-after",
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .join(", "),
        allow_credentials: raw.allow_credentials,
        max_age: raw.max_age.map(|d| d.0).unwrap_or(Duration::from_secs(600)),
    })
}

/// Parses a list of CIDRs (a bare IP is a /32 or /128).
pub fn cidrs(at: &str, raw: &[String], problems: &mut Vec<String>) -> Vec<IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, c)| match parse_cidr(c) {
            Some(n) => Some(n),
            None => {
                problems.push(format!(
                    "{at}[{i}]: {c:?} is not a CIDR (e.g. 10.0.0.0/8) or IP"
                ));
                None
            }
        })
        .collect()
}

fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Parses `dns:`.
pub fn dns(raw: RawDns, problems: &mut Vec<String>) -> DnsSettings {
    let mut nameservers = Vec::new();
    for (i, n) in raw.nameservers.iter().enumerate() {
        match n
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| n.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
        {
            Some(a) => nameservers.push(a),
            None => problems.push(format!(
                "dns.nameservers[{i}]: {n:?} is not an IP or IP:port"
            )),
        }
    }
    DnsSettings {
        nameservers,
        timeout: raw.timeout.map(|d| d.0),
    }
}

/// Parses `admin:`.
pub fn admin(
    raw: RawAdmin,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> AdminSettings {
    let text = raw.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let listen = match text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            problems.push(format!("admin.listen: {text:?} is not an IP:port address"));
            DEFAULT_ADMIN_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9090)))
        }
    };
    let key = match raw.key.map(|k| secret::resolve(&k, env)) {
        Some(Ok(k)) if k.len() < 16 => {
            problems.push("admin.key: too short (at least 16 characters)".to_string());
            None
        }
        Some(Ok(k)) => Some(Secret::new(k)),
        Some(Err(why)) => {
            problems.push(format!("admin.key: {why}"));
            None
        }
        None => None,
    };
    if key.is_none() && !listen.ip().is_loopback() {
        problems.push(format!(
            "admin.key: required because admin.listen {listen} is not a loopback address"
        ));
    }
    AdminSettings { listen, key }
}

/// Parses `access_log:`; `None` when absent or `path: off`.
pub fn access_log(
    raw: Option<RawAccessLog>,
    problems: &mut Vec<String>,
) -> Option<AccessLogSettings> {
    let raw = raw?;
    let target = match raw.path.as_str() {
        "off" => return None,
        "stderr" => AccessLogTarget::Stderr,
        "" => {
            problems.push("access_log.path: empty (use stderr, off or a file path)".into());
            return None;
        }
        p => AccessLogTarget::File(PathBuf::from(p)),
    };
    let queue = raw.queue.unwrap_or(65_536);
    if queue == 0 {
        problems.push("access_log.queue: must be at least 1".to_string());
    }
    Some(AccessLogSettings {
        target,
        format: raw.format.unwrap_or_default(),
        queue: queue.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex() {
        let h =
            parse_sha256_hex("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
                .unwrap();
        assert_eq!(h, <[u8; 32]>::from(Sha256::digest(b"test")));
        assert!(parse_sha256_hex("9f86").is_none());
        assert!(parse_sha256_hex(&"g".repeat(64)).is_none());
    }

    #[test]
    fn cidr_forms() {
        assert_eq!(
            parse_cidr("10.1.2.3/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert!(parse_cidr("10.0.0.0/33").is_none());
    }
}
