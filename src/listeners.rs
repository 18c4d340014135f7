//! Adds the configured listeners to a Pingora service: plain HTTP/1.1, or TLS (rustls) with
//! HTTP/2 and HTTP/1.1 negotiated by ALPN.

use crate::config::edge::Listener;
use pingora::listeners::tls::TlsSettings;
use pingora::services::listening::Service;

/// Adds one listener. TLS files were checked by config validation; a failure to load them
/// here is a start-up error.
pub fn add<A>(svc: &mut Service<A>, l: &Listener) {
    let addr = l.addr.to_string();
    match &l.tls {
        None => svc.add_tcp(&addr),
        Some(t) => {
            let (cert, key) = (t.cert.display().to_string(), t.key.display().to_string());
            match TlsSettings::intermediate(&cert, &key) {
                Ok(mut settings) => {
                    settings.enable_h2();
                    svc.add_tls_with_settings(&addr, None, settings);
                }
                Err(e) => tracing::error!("listener {addr}: TLS settings: {e}"),
            }
        }
    }
}
