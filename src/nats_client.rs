//! Every NATS connection, from `adapter.nats`: the servers, TLS with a private CA, and one
//! way to sign in (user and password, token, `.creds` file or nkey seed). Used by the cluster
//! transport and the durable webhook queue.

use std::future::Future;
use std::time::Duration;

use crate::config::{mask_url_password, NatsConfig};
use crate::redis_client::{SetupError, CONNECT_TIMEOUT};

/// How a NATS connection signs in and whom it trusts, from `config` (files read here: an
/// unreadable one is an error naming its key). Secrets never reach a log line.
async fn options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, SetupError> {
    let unreadable = |key: &'static str, path: &str, e: &dyn std::fmt::Display| SetupError {
        key,
        message: format!("cannot read {path}: {e}"),
    };
    let mut options = if !config.credentials_path.is_empty() {
        let path = &config.credentials_path;
        async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| unreadable("adapter.nats.credentials_path", path, &e))?
    } else if !config.nkey_path.is_empty() {
        let path = &config.nkey_path;
        let seed = std::fs::read_to_string(path).map_err(|e| unreadable("adapter.nats.nkey_path", path, &e))?;
        // async-nats panics on a bad seed only when signing; check it now, so a wrong file is
        // a config error at startup.
        let seed = seed.trim().to_owned();
        if nkeys::KeyPair::from_seed(&seed).is_err() {
            return Err(SetupError { key: "adapter.nats.nkey_path", message: format!("{path} holds no nkey seed") });
        }
        async_nats::ConnectOptions::with_nkey(seed)
    } else if !config.token.is_empty() {
        async_nats::ConnectOptions::with_token(config.token.clone())
    } else if !config.username.is_empty() {
        async_nats::ConnectOptions::with_user_and_password(config.username.clone(), config.password.clone())
    } else {
        async_nats::ConnectOptions::new()
    };
    if !config.ca_path.is_empty() {
        let path = &config.ca_path;
        // async-nats reads the file only when connecting and reports a vague TLS error; a
        // missing file is named here.
        std::fs::metadata(path).map_err(|e| unreadable("adapter.nats.ca_path", path, &e))?;
        options = options.add_root_certificates(path.into()).require_tls(true);
    }
    Ok(options)
}

/// Connects (fails if no server answers within 5 s); async-nats reconnects and resubscribes
/// on its own afterwards, and reports each change to `on_event`.
pub async fn connect<F, Fut>(config: &NatsConfig, on_event: F) -> Result<async_nats::Client, SetupError>
where
    F: Fn(async_nats::Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + Sync + 'static,
{
    let servers = &config.servers;
    let shown: Vec<String> = servers.iter().map(|s| mask_url_password(s)).collect();
    let fail = |e: &dyn std::fmt::Display| SetupError {
        key: "adapter.nats.servers",
        message: format!("cannot connect to NATS at {}: {e}", shown.join(",")),
    };
    let addrs = servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    let options =
        options(config).await?.connection_timeout(CONNECT_TIMEOUT).max_reconnects(None).event_callback(on_event);
    tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), async_nats::connect_with_options(addrs, options))
        .await
        .map_err(|_| fail(&"timed out"))?
        .map_err(|e| fail(&e))
}
