//! Asynchronous DNS for hostname endpoints (hickory): the system configuration, or the
//! nameservers of `dns.nameservers`. Never called on the request path.

use crate::config::edge::DnsSettings;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use std::net::IpAddr;
use tokio::sync::OnceCell;

/// A lazily built resolver (built inside the runtime that first uses it).
#[derive(Default)]
pub struct Dns {
    settings: DnsSettings,
    resolver: OnceCell<TokioResolver>,
}

impl Dns {
    /// A resolver using the system configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resolver with the given settings.
    pub fn with_settings(settings: DnsSettings) -> Self {
        Self {
            settings,
            resolver: OnceCell::new(),
        }
    }

    async fn resolver(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_try_init(|| async {
                let mut builder = if self.settings.nameservers.is_empty() {
                    TokioResolver::builder_tokio()
                        .map_err(|e| format!("reading the system resolver configuration: {e}"))?
                } else {
                    let mut cfg = ResolverConfig::new();
                    for ns in &self.settings.nameservers {
                        cfg.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
                        cfg.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
                    }
                    let mut b =
                        TokioResolver::builder_with_config(cfg, TokioConnectionProvider::default());
                    // Explicit nameservers only: /etc/hosts must not answer instead.
                    b.options_mut().use_hosts_file = ResolveHosts::Never;
                    b
                };
                if let Some(t) = self.settings.timeout {
                    builder.options_mut().timeout = t;
                }
                Ok(builder.build())
            })
            .await
    }

    /// Every address of `host` (A and AAAA), honouring record TTLs through the resolver cache.
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
