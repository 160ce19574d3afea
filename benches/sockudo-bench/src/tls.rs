//! TLS for `wss://` and `https://` targets (`--tls`, `--ca FILE`, `--tls-name NAME`): one
//! rustls client configuration with the ring provider (the server's; no aws-lc-rs in the
//! tree), trusting the given CA file or else the system's roots.
//!
//! Session resumption is off, so every connection pays a full handshake: the figure measured
//! is the worst case and does not depend on how many sessions a cache happened to hold.

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// How to speak TLS to a target.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    /// The name the server's certificate must carry (DNS name or IP address).
    pub name: ServerName<'static>,
}

impl TlsTarget {
    /// Trusts the PEM certificates in `ca` (or the system's roots without it) and verifies
    /// the server as `name`.
    pub fn new(ca: Option<&Path>, name: &str) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("--ca {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("--ca {}: no certificate in the file", path.display()));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| format!("--ca {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err("--tls without --ca: no usable system root certificate".into());
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // What a browser offers for a WebSocket (and what the server accepts).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(name.to_owned()).map_err(|e| format!("--tls-name {name}: {e}"))?;
        Ok(Self { config: Arc::new(config), name })
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// What a finished handshake agreed on, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn describe(conn: &ClientConnection) -> String {
    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into());
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "?".into());
    let group = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_else(|| "?".into());
    format!("{version} {suite} {group}")
}
