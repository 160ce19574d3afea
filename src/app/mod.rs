//! Apps (tenants): their settings, secret and metric attribute sets, loaded once and looked up by
//! key on connect and by id on API calls.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{AppConfig, Config};
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
    /// Connections of this app open on this node (for `max_connections`).
    connections: AtomicU64,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is deliberately left out.
        f.debug_struct("App").field("id", &self.id).field("key", &self.key).finish_non_exhaustive()
    }
}

impl App {
    pub fn new(settings: AppConfig, metrics: &Metrics) -> Self {
        Self {
            id: settings.id.clone(),
            key: settings.key.clone(),
            secret: settings.secret.clone(),
            attrs: metrics.app_attrs(&settings.id),
            settings,
            connections: AtomicU64::new(0),
        }
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn parse_limits(&self) -> ParseLimits {
        ParseLimits {
            max_channel_name_len: self.settings.max_channel_name_length,
            max_event_name_len: self.settings.max_event_name_length,
            max_client_payload_bytes: self.settings.max_event_payload_in_kb * 1024,
        }
    }

    pub fn publish_limits(&self) -> PublishLimits {
        PublishLimits {
            max_channel_name_len: self.settings.max_channel_name_length,
            max_event_name_len: self.settings.max_event_name_length,
            max_payload_bytes: self.settings.max_event_payload_in_kb * 1024,
            max_channels: self.settings.max_event_channels_at_once,
            max_batch: self.settings.max_event_batch_size,
        }
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

/// Apps from the config file, indexed by key and by id.
pub struct AppManager {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
}

impl AppManager {
    pub fn from_config(config: &Config, metrics: &Metrics) -> Self {
        let mut by_key = HashMap::new();
        let mut by_id = HashMap::new();
        for settings in &config.app_manager.array.apps {
            let app = Arc::new(App::new(settings.clone(), metrics));
            by_key.insert(app.key.clone(), app.clone());
            by_id.insert(app.id.clone(), app);
        }
        Self { by_key, by_id }
    }

    pub async fn find_by_key(&self, key: &str) -> Option<Arc<App>> {
        self.by_key.get(key).cloned()
    }

    pub async fn find_by_id(&self, id: &str) -> Option<Arc<App>> {
        self.by_id.get(id).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<App>> {
        self.by_id.values()
    }
}
