//! Asynchronous hostname resolution (hickory), so `HttpPeer` only ever gets a `SocketAddr`.

use hickory_resolver::TokioResolver;
use std::net::IpAddr;
use tokio::sync::OnceCell;

/// A lazily built resolver: built on first use inside the runtime that uses it, so its
/// background connections live on that runtime.
#[derive(Default)]
pub struct Dns {
    resolver: OnceCell<TokioResolver>,
}

impl Dns {
    /// A resolver reading the system configuration (`/etc/resolv.conf`, hosts file) on first use.
    pub fn new() -> Self {
        Self::default()
    }

    async fn resolver(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_try_init(|| async {
                TokioResolver::builder_tokio()
                    .map(|b| b.build())
                    .map_err(|e| format!("reading the system resolver configuration: {e}"))
            })
            .await
    }

    /// Resolves `host` to its addresses (A and AAAA), or explains why not.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let resolver = self.resolver().await?;
        let answer = resolver
            .lookup_ip(host)
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?;
        let ips: Vec<IpAddr> = answer.iter().collect();
        if ips.is_empty() {
            return Err(format!("resolving {host}: no addresses"));
        }
        Ok(ips)
    }
}
