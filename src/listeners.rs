//! Adds the configured listeners to a Pingora service: plain HTTP/1.1, or TLS (rustls) with
//! HTTP/2 and HTTP/1.1 negotiated by ALPN. TLS certificates are served through a resolver that
//! a reload refreshes from the same files, so a renewed certificate needs no restart.

use crate::config::edge::{Listener, TlsFiles};
use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::services::listening::Service;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use std::sync::Arc;

/// The certificate of one TLS listener, swappable at reload.
#[derive(Debug)]
pub struct ReloadableCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// Loads the certificate chain and key.
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, String> {
        let key = read(files)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            current: ArcSwap::from_pointee(key),
        }))
    }

    /// Re-reads the files; on error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        self.current.store(Arc::new(read(&self.files)?));
        Ok(())
    }

    /// The certificate file, for logs.
    pub fn cert_path(&self) -> String {
        self.files.cert.display().to_string()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let (chain, private) = pingora::tls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| format!("{cert} / {key}: {e}"))?
        .ok_or_else(|| format!("{cert} / {key}: no certificate or no private key found"))?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "no rustls crypto provider installed".to_string())?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("{key}: {e}"))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Bytes a client connection gathers before writing to it. A `Content-Length`
/// response head waits here for its body, and the two leave in one write only if both fit:
/// with Pingora's default of 1,460 bytes, a reply body over about 1.2 KiB (most non-stream
/// completions) went out as a second write. 8 KiB holds a typical completion; the buffer is
/// allocated per connection, at a measured +2.3 MB of peak RSS per 1,000 open streams.
const DOWNSTREAM_WRITE_BUFFER: usize = 8 << 10;

/// Adds one listener; `cert` is the loaded certificate of a TLS listener.
pub fn add<A>(svc: &mut Service<A>, l: &Listener, cert: Option<Arc<ReloadableCert>>) {
    let addr = l.addr.to_string();
    match cert {
        // No L4 read buffer on plain TCP: Pingora reads request heads and bodies into buffers
        // of their own, so its default 64 KiB buffer per connection only added a copy of
        // every byte read (S2) and memory to every open connection (S5). TLS keeps it: TLS
        // records are read in small pieces.
        None => svc.add_listener(
            ListenerConfig::tcp(addr).l4_buffer(
                L4BufferSettings::default()
                    .read(0)
                    .write(DOWNSTREAM_WRITE_BUFFER),
            ),
        ),
        Some(cert) => {
            let Ok(mut settings) = TlsSettings::intermediate("", "") else {
                tracing::error!("listener {addr}: TLS settings could not be created");
                return;
            };
            settings.set_cert_resolver(cert);
            settings.enable_h2();
            // The write buffer sits under TLS: a reply's head and body records leave together.
            svc.add_listener(
                ListenerConfig::tcp(addr)
                    .tls(settings)
                    .l4_buffer(L4BufferSettings::default().write(DOWNSTREAM_WRITE_BUFFER)),
            );
        }
    }
}
