//! TLS for the listeners (rustls with ring; no OpenSSL): a PEM certificate chain and key,
//! checked when the server starts (an unreadable, empty or mismatched pair is a configuration
//! error naming the key), and replaced without a restart on SIGHUP or when the files change.
//!
//! The certificate lives behind a resolver that every handshake asks, so a reload changes
//! what new handshakes present and nothing else: open connections keep their session. A new
//! pair that does not load is logged and the old one kept, so a half-written rotation (the
//! certificate copied, the key not yet) never takes the listener down.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::{ConfigError, SslConfig};
use crate::shutdown::Shutdown;

/// The first byte of every TLS record that opens a handshake.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain-HTTP client sent to a TLS port gets back, as nginx does, instead of a reset
/// it would have to guess the meaning of.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Connection: close\r\nContent-Length: 63\r\n\r\n{\"error\":\"This port speaks TLS: use https:// or wss:// instead.\"}";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One listener's certificate files and the configuration key they came from.
#[derive(Debug, Clone)]
struct Source {
    /// `ssl` or `metrics.ssl`.
    key: &'static str,
    cert: PathBuf,
    private_key: PathBuf,
}

impl Source {
    fn error(&self, field: &str, message: String) -> ConfigError {
        ConfigError::new(format!("{}.{field}", self.key), message)
    }

    /// Reads and pairs the chain and key.
    fn load(&self) -> Result<Arc<CertifiedKey>, ConfigError> {
        let shown = self.cert.display();
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.error("cert_path", format!("cannot read a PEM certificate chain from {shown}: {e}")))?;
        if chain.is_empty() {
            return Err(self.error("cert_path", format!("no certificate in {shown}")));
        }
        let key_shown = self.private_key.display();
        let key = PrivateKeyDer::from_pem_file(&self.private_key)
            .map_err(|e| self.error("key_path", format!("cannot read a PEM private key from {key_shown}: {e}")))?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| self.error("key_path", format!("{key_shown}: unsupported key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            self.error("key_path", format!("{key_shown} does not belong to the certificate in {shown}: {e}"))
        })?;
        Ok(Arc::new(certified))
    }

    /// What identifies the files' current contents without reading them: size, modification
    /// time and inode of each (a Kubernetes secret update swaps a symlink: the inode changes).
    fn fingerprint(&self) -> Option<[(u64, SystemTime, u64); 2]> {
        let one = |p: &PathBuf| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?, inode(&m)))
        };
        Some([one(&self.cert)?, one(&self.private_key)?])
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A listener's TLS: the acceptor and the certificate it presents.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    source: Source,
    watch_interval: Duration,
}

impl Tls {
    /// The TLS of `ssl` (under configuration key `key`), or `None` when it is off.
    pub fn from_config(ssl: &SslConfig, key: &'static str) -> Result<Option<Arc<Self>>, ConfigError> {
        if !ssl.enabled {
            return Ok(None);
        }
        let source = Source { key, cert: ssl.cert_path.clone().into(), private_key: ssl.key_path.clone().into() };
        let current = Arc::new(Current(RwLock::new(source.load()?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(key, format!("cannot set up TLS: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // WebSocket upgrades and the API are HTTP/1.1; a client offering only h2 is told so.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Some(Arc::new(Self {
            acceptor,
            current,
            source,
            watch_interval: Duration::from_millis(ssl.watch_interval_ms),
        })))
    }

    /// Reads the files again; on success new handshakes present the new certificate.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let fresh = self.source.load()?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The handshake of one accepted connection. A client that opens with anything but a TLS
    /// handshake (plain HTTP, most likely) is answered with a 400 in plain text and closed.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let mut first = [0u8; 1];
        let n = stream.peek(&mut first).await?;
        if n == 0 || first[0] != HANDSHAKE_RECORD {
            let mut stream = stream;
            if n > 0 {
                let _ = stream.write_all(PLAIN_HTTP_ANSWER).await;
                let _ = stream.shutdown().await;
            }
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a TLS handshake"));
        }
        self.acceptor.accept(stream).await
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.source.key, self.source.cert.display())
    }
}

/// Reloads every listener's certificate on SIGHUP, and each one when its files change (checked
/// every `watch_interval_ms`), until shutdown. The SIGHUP handler is installed by this call,
/// before the returned future is spawned or the listeners serve: SIGHUP's default action ends
/// the process, so an operator's reload right after startup must find the handler in place.
pub fn reload_on_change(
    listeners: Vec<Arc<Tls>>,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let hangup = if listeners.is_empty() { None } else { hangup_signal() };
    watch(listeners, hangup, shutdown)
}

async fn watch(listeners: Vec<Arc<Tls>>, mut hangup: Hangup, shutdown: Shutdown) {
    if listeners.is_empty() {
        return;
    }
    let every = listeners.iter().map(|t| t.watch_interval).filter(|d| !d.is_zero()).min();
    let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Vec<_> = listeners.iter().map(|t| t.source.fingerprint()).collect();
    loop {
        let forced = tokio::select! {
            _ = recv(&mut hangup) => true,
            _ = tick.tick() => false,
            _ = shutdown.wait() => return,
        };
        for (tls, last) in listeners.iter().zip(seen.iter_mut()) {
            let now = tls.source.fingerprint();
            let changed = !tls.watch_interval.is_zero() && now != *last;
            if !(forced || changed) {
                continue;
            }
            // Remembered even when the load fails: a bad file is reported once, and the next
            // write (the missing half of the pair) is a change again.
            *last = now;
            match tls.reload() {
                Ok(()) => tracing::info!(listener = %tls.describe(), sighup = forced, "TLS certificate reloaded"),
                Err(e) => tracing::warn!(
                    listener = %tls.describe(), error = %e,
                    "TLS certificate not reloaded; new handshakes keep the previous one"
                ),
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// Waits for the next SIGHUP (forever where there is none).
async fn recv(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// Checks both listeners' files at startup: the error names the key. `main` calls it before
/// binding, as it does the rest of the configuration.
pub fn check(config: &crate::config::Config) -> Result<(), ConfigError> {
    Tls::from_config(&config.ssl, "ssl")?;
    Tls::from_config(&config.metrics.ssl, "metrics.ssl")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(cert: &str, key: &str) -> Source {
        Source { key: "ssl", cert: cert.into(), private_key: key.into() }
    }

    #[test]
    fn missing_files_name_their_key() {
        let e = source("/nonexistent/cert.pem", "/nonexistent/key.pem").load().unwrap_err();
        assert_eq!(e.key, "ssl.cert_path");
        let dir = std::env::temp_dir().join(format!("sockudo-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = source(empty.to_str().unwrap(), "/nonexistent/key.pem").load().unwrap_err();
        assert_eq!(e.key, "ssl.cert_path");
        assert!(e.message.contains("no certificate"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
