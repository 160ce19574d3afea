//! Apps (tenants): their settings, secret and metric attribute sets, looked up by key on connect
//! and by id on API calls. They come from the config file (`app_manager.driver = "config"`) or
//! from a PostgreSQL or MySQL/MariaDB table behind a TTL cache (`sql.rs`, `cache.rs`).

mod cache;
mod sql;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{AppConfig, Config, ConfigError};
use crate::protocol::client::ParseLimits;
use crate::protocol::rest::PublishLimits;
use crate::telemetry::{AppAttrs, Metrics};

/// One app with everything derived from its settings.
pub struct App {
    pub id: String,
    pub key: String,
    secret: String,
    pub settings: AppConfig,
    /// Metric attribute sets, built once.
    pub attrs: AppAttrs,
    /// Connections of this app open on this node (for `max_connections`), shared with the `App`
    /// that a changed row in the app table replaces.
    connections: Arc<AtomicU64>,
    /// Told when the app store replaces this app (its row changed) or removes it, so that open
    /// sockets follow: a disabled app's sockets close, a rotated secret signs the next auth.
    replaced: watch::Sender<Replaced>,
}

/// What became of an `App` that open sockets hold.
#[derive(Debug, Clone, Default)]
pub enum Replaced {
    /// Still current.
    #[default]
    Current,
    /// Its settings changed: this is the app now.
    By(Arc<App>),
    /// Its row is gone.
    Removed,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is deliberately left out.
        f.debug_struct("App").field("id", &self.id).field("key", &self.key).finish_non_exhaustive()
    }
}

impl App {
    pub fn new(settings: AppConfig, metrics: &Metrics) -> Self {
        Self::with_connections(settings, metrics, Arc::default())
    }

    /// An app that counts its connections in `connections`, which it may share with the `App` it
    /// replaces.
    fn with_connections(settings: AppConfig, metrics: &Metrics, connections: Arc<AtomicU64>) -> Self {
        Self {
            id: settings.id.clone(),
            key: settings.key.clone(),
            secret: settings.secret.clone(),
            attrs: metrics.app_attrs(&settings.id),
            settings,
            connections,
            replaced: watch::Sender::new(Replaced::Current),
        }
    }

    /// Wakes when this app is replaced or removed (see [`App::replacement`]).
    pub fn watch_replaced(&self) -> watch::Receiver<Replaced> {
        self.replaced.subscribe()
    }

    /// What replaced this app, if anything did.
    pub fn replacement(&self) -> Replaced {
        self.replaced.borrow().clone()
    }

    /// Tells the sockets holding this app what replaced it.
    fn replace(&self, by: Replaced) {
        self.replaced.send_replace(by);
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn parse_limits(&self) -> ParseLimits {
        parse_limits(&self.settings)
    }

    pub fn publish_limits(&self) -> PublishLimits {
        publish_limits(&self.settings)
    }

    /// Takes a connection slot under the app's quota; false when the app is full.
    pub fn try_acquire_connection(&self) -> bool {
        let max = self.settings.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok()
    }

    /// Whether a WebSocket with this `Origin` header may connect. Requests without the header
    /// (non-browser clients) are allowed: the check protects browsers, it is not authentication.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let allowed = &self.settings.allowed_origins;
        let Some(origin) = origin else { return true };
        if allowed.is_empty() {
            return true;
        }
        let host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
        allowed.iter().any(|pattern| {
            pattern == "*"
                || pattern == origin
                || pattern == host
                || pattern
                    .strip_prefix("*.")
                    .is_some_and(|suffix| host.strip_suffix(suffix).is_some_and(|rest| rest.ends_with('.')))
        })
    }

    pub fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }
}

/// A lookup the app store could not answer (the database is down and the app is not cached).
/// It is not "no such app": the API answers it with 503, not 404.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("app lookup failed")]
    Unavailable,
}

/// Where apps come from.
enum Backend {
    /// The config file's apps, indexed by key and by id.
    Config {
        by_key: HashMap<String, Arc<App>>,
        by_id: HashMap<String, Arc<App>>,
    },
    Sql(Box<sql::SqlApps>),
    /// A SQL store that could not be built by `from_config` (it does not return errors): every
    /// lookup fails. `connect` reports the same problem at startup instead.
    Broken,
}

/// The apps, looked up by key and by id.
pub struct AppManager {
    backend: Backend,
}

impl AppManager {
    /// The app manager for `app_manager.driver`, without touching the network: a SQL pool
    /// connects on first use. Prefer [`AppManager::connect`], which checks the database at
    /// startup.
    pub fn from_config(config: &Config, metrics: &Arc<Metrics>) -> Self {
        if config.app_manager.driver == "config" {
            return Self::from_apps(&config.app_manager.array.apps, metrics);
        }
        match sql::SqlApps::lazy(config, metrics) {
            Ok(apps) => Self { backend: Backend::Sql(Box::new(apps)) },
            Err(error) => {
                tracing::error!(error = %error, "the app store cannot be used; every app lookup will fail");
                Self { backend: Backend::Broken }
            }
        }
    }

    /// The app manager for `app_manager.driver`. With a SQL driver it connects and reads the
    /// table once, so an unreachable database or a missing table stops startup with a
    /// `ConfigError` naming `app_manager.sql.url` or `app_manager.sql.table` (password masked).
    pub async fn connect(config: &Config, metrics: &Arc<Metrics>) -> Result<Self, ConfigError> {
        if config.app_manager.driver == "config" {
            return Ok(Self::from_apps(&config.app_manager.array.apps, metrics));
        }
        Ok(Self { backend: Backend::Sql(Box::new(sql::SqlApps::connect(config, metrics).await?)) })
    }

    fn from_apps(apps: &[AppConfig], metrics: &Metrics) -> Self {
        let mut by_key = HashMap::new();
        let mut by_id = HashMap::new();
        for settings in apps {
            let app = Arc::new(App::new(settings.clone(), metrics));
            by_key.insert(app.key.clone(), app.clone());
            by_id.insert(app.id.clone(), app);
        }
        Self { backend: Backend::Config { by_key, by_id } }
    }

    async fn lookup(&self, by: cache::By, needle: &str) -> Result<Option<Arc<App>>, LookupError> {
        match &self.backend {
            Backend::Config { by_key, by_id } => {
                let index = match by {
                    cache::By::Key => by_key,
                    cache::By::Id => by_id,
                };
                Ok(index.get(needle).cloned())
            }
            Backend::Sql(apps) => apps.find(by, needle).await,
            Backend::Broken => Err(LookupError::Unavailable),
        }
    }

    /// The app with this key; `Err` when the app store cannot answer and the app is not cached.
    pub async fn lookup_by_key(&self, key: &str) -> Result<Option<Arc<App>>, LookupError> {
        self.lookup(cache::By::Key, key).await
    }

    /// The app with this id; `Err` when the app store cannot answer and the app is not cached.
    pub async fn lookup_by_id(&self, id: &str) -> Result<Option<Arc<App>>, LookupError> {
        self.lookup(cache::By::Id, id).await
    }

    /// The app with this key, `None` when there is none or it cannot be looked up.
    pub async fn find_by_key(&self, key: &str) -> Option<Arc<App>> {
        self.lookup_by_key(key).await.ok().flatten()
    }

    /// The app with this id, `None` when there is none or it cannot be looked up.
    pub async fn find_by_id(&self, id: &str) -> Option<Arc<App>> {
        self.lookup_by_id(id).await.ok().flatten()
    }

    /// The app with this key if it is known without a database query (for labelling what is
    /// refused before any lookup is spent on it).
    pub fn cached_by_key(&self, key: &str) -> Option<Arc<App>> {
        match &self.backend {
            Backend::Config { by_key, .. } => by_key.get(key).cloned(),
            Backend::Sql(apps) => apps.peek_key(key),
            Backend::Broken => None,
        }
    }

    /// How often [`AppManager::refresh_in_use`] should run; `None` when apps cannot change (the
    /// config file's).
    pub fn refresh_every(&self) -> Option<std::time::Duration> {
        match &self.backend {
            Backend::Sql(apps) => Some(apps.refresh_every()),
            Backend::Config { .. } | Backend::Broken => None,
        }
    }

    /// Re-reads the apps that open sockets hold, once past their TTL; a changed or removed app
    /// tells its sockets (see [`App::watch_replaced`]).
    pub async fn refresh_in_use(&self) {
        if let Backend::Sql(apps) = &self.backend {
            apps.refresh_in_use().await;
        }
    }

    /// Every configured app; with a SQL driver, the apps cached now.
    pub fn all(&self) -> Vec<Arc<App>> {
        match &self.backend {
            Backend::Config { by_id, .. } => by_id.values().cloned().collect(),
            Backend::Sql(apps) => apps.cached(),
            Backend::Broken => Vec::new(),
        }
    }
}

/// The limits a session parses an app's client frames with.
pub fn parse_limits(settings: &AppConfig) -> ParseLimits {
    ParseLimits {
        max_channel_name_len: settings.max_channel_name_length,
        max_event_name_len: settings.max_event_name_length,
        max_client_payload_bytes: settings.max_event_payload_in_kb * 1024,
    }
}

/// The limits an API publish to an app is checked against.
pub fn publish_limits(settings: &AppConfig) -> PublishLimits {
    PublishLimits {
        max_channel_name_len: settings.max_channel_name_length,
        max_event_name_len: settings.max_event_name_length,
        max_payload_bytes: settings.max_event_payload_in_kb * 1024,
        max_channels: settings.max_event_channels_at_once,
        max_batch: settings.max_event_batch_size,
    }
}
