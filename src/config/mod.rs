//! Typed configuration with defaults: the embedded default (`config/sockudo.json`), then an
//! optional `--config` file (JSON or TOML, with `${VAR}` / `${VAR:-default}` substitution), then
//! environment variables. [`Config::validate`] runs before anything binds; every error names the
//! key or variable at fault.

mod env;
mod load;

use serde::{Deserialize, Deserializer, Serialize};

pub use load::{load, mask_secrets, mask_url_password, ConfigError};

/// The embedded default configuration, also shipped as `config/sockudo.json`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/sockudo.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the WebSocket + HTTP API listener.
    pub host: String,
    pub port: u16,
    /// `true` means log level `debug` unless `log_level` says otherwise.
    pub debug: bool,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// Seconds of client silence before the server pings (sent to clients in
    /// `connection_established`).
    pub activity_timeout: u64,
    /// Seconds to wait for a pong after a server ping before closing with 4201.
    pub pong_timeout: u64,
    /// Open connections this node accepts; 0 means no limit.
    pub max_connections: u64,
    /// Admission control by memory: above this resident size (MiB) new connections are refused
    /// with 4100 (clients back off and retry) instead of meeting the OOM killer; 0 turns it off.
    pub max_memory_mb: u64,
    /// Seconds that shutdown waits for sockets and requests to finish.
    pub shutdown_grace_period: u64,
    /// Delay that coalesces subscription-count changes into one `subscription_count` event.
    pub subscription_count_debounce_ms: u64,
    /// How long a watched user stays `online` after its last signed-in socket closed, so that a
    /// reconnect within it (to any node) does not send watchers `offline` and `online` again.
    pub watchlist_offline_grace_ms: u64,
    /// TLS on the WebSocket + API listener (`wss://` and `https://` on `port`).
    pub ssl: SslConfig,
    pub cache: CacheConfig,
    pub websocket: WebSocketConfig,
    pub http_api: HttpApiConfig,
    pub adapter: AdapterConfig,
    pub metrics: MetricsConfig,
    pub otel: OtelConfig,
    pub webhooks: WebhooksConfig,
    pub rate_limits: RateLimitConfig,
    pub app_manager: AppManagerConfig,
}

/// OpenTelemetry export (OTLP push of traces, metrics and logs). Every field has the standard
/// `OTEL_*` variable as its environment override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// `OTEL_SDK_DISABLED=true` turns every OTLP exporter off.
    pub sdk_disabled: bool,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; empty means no OTLP export at all.
    pub endpoint: String,
    /// Per-signal endpoints (`OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT`), used as given.
    pub traces_endpoint: String,
    pub metrics_endpoint: String,
    pub logs_endpoint: String,
    /// `grpc`, `http/protobuf` or `http/json` (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub protocol: String,
    /// `key=value,key2=value2` (`OTEL_EXPORTER_OTLP_HEADERS`); masked by `--check-config`.
    pub headers: String,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `key=value,...` (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: String,
    /// `otlp` or `none` (`OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`, `OTEL_LOGS_EXPORTER`).
    pub traces_exporter: String,
    pub metrics_exporter: String,
    pub logs_exporter: String,
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
    pub traces_sampler: String,
    pub traces_sampler_arg: String,
    /// `OTEL_METRIC_EXPORT_INTERVAL`, in milliseconds.
    pub metric_export_interval_ms: u64,
    /// Export timeout and the deadline for the final flush at shutdown, in milliseconds.
    pub export_timeout_ms: u64,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            sdk_disabled: false,
            endpoint: String::new(),
            traces_endpoint: String::new(),
            metrics_endpoint: String::new(),
            logs_endpoint: String::new(),
            protocol: "grpc".into(),
            headers: String::new(),
            service_name: "sockudo".into(),
            resource_attributes: String::new(),
            traces_exporter: "otlp".into(),
            metrics_exporter: "otlp".into(),
            logs_exporter: "otlp".into(),
            traces_sampler: "parentbased_always_on".into(),
            traces_sampler_arg: String::new(),
            metric_export_interval_ms: 60_000,
            export_timeout_ms: 5_000,
        }
    }
}

/// One OTLP signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl OtelConfig {
    /// The endpoint a signal is exported to, when it is exported at all.
    pub fn endpoint_for(&self, signal: Signal) -> Option<String> {
        if self.sdk_disabled {
            return None;
        }
        let (exporter, specific, path) = match signal {
            Signal::Traces => (&self.traces_exporter, &self.traces_endpoint, "v1/traces"),
            Signal::Metrics => (&self.metrics_exporter, &self.metrics_endpoint, "v1/metrics"),
            Signal::Logs => (&self.logs_exporter, &self.logs_endpoint, "v1/logs"),
        };
        if exporter != "otlp" {
            return None;
        }
        if !specific.is_empty() {
            return Some(specific.clone());
        }
        if self.endpoint.is_empty() {
            return None;
        }
        // The spec: the HTTP exporter appends the signal's path to the base endpoint.
        Some(if self.is_grpc() {
            self.endpoint.clone()
        } else {
            format!("{}/{path}", self.endpoint.trim_end_matches('/'))
        })
    }

    pub fn is_grpc(&self) -> bool {
        self.protocol == "grpc"
    }

    /// OTLP/HTTP with JSON bodies instead of protobuf.
    pub fn is_json(&self) -> bool {
        self.protocol == "http/json"
    }

    /// `key=value` pairs of a comma-separated list, percent-decoded as the spec says.
    pub fn pairs(list: &str) -> Vec<(String, String)> {
        list.split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let decode = |s: &str| {
                    form_urlencoded::parse(s.trim().as_bytes()).next().map(|(k, _)| k.into_owned()).unwrap_or_default()
                };
                (decode(k), decode(v))
            })
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a cache channel keeps its last event.
    pub ttl_seconds: u64,
    /// MiB of cache channels' last events one app may hold on this node; past it the app's
    /// oldest stored events are evicted.
    pub max_mb_per_app: u64,
    /// MiB of cache channels' last events all apps together may hold on this node. A store that
    /// would pass it evicts only the writing app's oldest events, never another app's.
    pub max_mb: u64,
}

impl CacheConfig {
    /// `max_mb_per_app` in bytes (validation refuses values whose byte count overflows).
    pub fn max_bytes_per_app(&self) -> u64 {
        self.max_mb_per_app.saturating_mul(1024 * 1024)
    }

    /// `max_mb` in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_mb.saturating_mul(1024 * 1024)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Messages above this get `pusher:error` 4300 and are dropped; the socket stays open.
    pub max_message_size_kb: usize,
    /// Frames above this close the socket with 1009 (they are not even buffered).
    pub hard_max_message_size_kb: usize,
    /// Bytes a connection may have queued for sending before it is closed as a slow consumer.
    pub max_queue_kb: usize,
    /// Initial read buffer of each socket.
    pub read_buffer_size: usize,
    /// Outgoing frames are buffered up to this before a write is forced.
    pub write_buffer_size: usize,
    /// A write to a socket that takes longer than this closes it as a slow consumer (4100).
    pub write_timeout_seconds: u64,
    /// Subscribe and unsubscribe requests one socket may make per second, sustained, after a
    /// burst of `MAX_SUBSCRIPTIONS_PER_CONNECTION` (a page subscribing to all its channels at
    /// once); beyond it 4302. 0 turns the limit off. Each new channel costs a cluster-wide
    /// count query, so churn is not free.
    pub max_subscription_ops_per_second: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpApiConfig {
    /// Largest request body accepted; larger bodies get 413 while being read.
    pub max_body_kb: usize,
    /// Accepted clock skew of `auth_timestamp`, in seconds.
    pub timestamp_tolerance_seconds: u64,
    /// A request head (including a WebSocket upgrade request) must arrive within this.
    pub header_read_timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterDriver {
    Local,
    Redis,
    Nats,
}

impl AdapterDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterDriver::Local => "local",
            AdapterDriver::Redis => "redis",
            AdapterDriver::Nats => "nats",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub driver: AdapterDriver,
    /// How long a cross-node query waits for every node before answering with what it has.
    pub request_timeout_ms: u64,
    /// A node silent for this long is dead: its presence members are removed everywhere.
    pub node_timeout_ms: u64,
    /// Key of the HMAC-SHA256 that signs every cluster envelope (`ADAPTER_CLUSTER_SECRET`; the
    /// same on every node). Without it the nodes trust whatever arrives on the broker topic.
    pub cluster_secret: Option<String>,
    pub redis: RedisConfig,
    pub nats: NatsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One server: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. With
    /// `sentinels` it gives only the master's scheme, credentials and database (the sentinels
    /// name its address).
    pub url: String,
    /// Key/channel prefix, so several clusters can share one Redis.
    pub prefix: String,
    /// PEM file of the CA that signed the servers' certificates, trusted instead of the system's
    /// roots (a private CA); empty for the system's roots. Needs `rediss://` URLs.
    pub ca_path: String,
    /// Sentinel mode when not empty: `redis://[user:password@]host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The master's name at the sentinels (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// Redis Cluster mode when not empty (it wins over `sentinels` and `url`): seed node URLs.
    pub cluster_nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats://host:port`, or `tls://host:port` to require TLS; credentials in a URL work too.
    pub servers: Vec<String>,
    /// Subject prefix, so several clusters can share one NATS.
    pub prefix: String,
    /// PEM file of the CA that signed the servers' certificates; when set, TLS is required.
    pub ca_path: String,
    /// At most one way to sign in: `username` + `password`, `token`, `credentials_path` (a
    /// `.creds` file: user JWT and nkey seed) or `nkey_path` (a file holding an nkey seed).
    pub username: String,
    pub password: String,
    pub token: String,
    pub credentials_path: String,
    pub nkey_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// `prometheus`, `otlp`, or both as `prometheus,otlp` (one meter provider feeds both).
    pub driver: String,
    pub host: String,
    pub port: u16,
    pub prometheus: PrometheusConfig,
    /// TLS on the metrics listener (`https://` for `/metrics` and `/stats`); off by default.
    pub ssl: SslConfig,
}

/// TLS on one listener (rustls): a PEM certificate chain, leaf first, and its private key.
/// The files are read again on SIGHUP and when they change, for new handshakes only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SslConfig {
    pub enabled: bool,
    pub cert_path: String,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.
    pub key_path: String,
    /// How often the two files are checked for a change (their size, modification time or
    /// inode, so a Kubernetes secret's symlink swap counts), in milliseconds; 0 checks only on
    /// SIGHUP.
    pub watch_interval_ms: u64,
}

impl Default for SslConfig {
    fn default() -> Self {
        Self { enabled: false, cert_path: String::new(), key_path: String::new(), watch_interval_ms: 10_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Prefix of every family name, `sockudo_` by default.
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppManagerConfig {
    /// `config`: apps from `array.apps`; `postgres` or `mysql` (MySQL and MariaDB): apps from
    /// the table at `sql` (`APP_MANAGER_DRIVER`).
    pub driver: String,
    pub array: AppArray,
    pub sql: SqlAppsConfig,
}

/// Apps from PostgreSQL or MySQL/MariaDB, looked up on demand and cached for a while. The schema
/// is `migrations/{postgres,mysql}/0001_apps.sql`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlAppsConfig {
    /// `postgres://user:password@host:5432/db` or `mysql://user:password@host:3306/db`
    /// (`DATABASE_URL`). It must be reachable at startup; its password is masked in messages.
    pub url: String,
    /// The apps table, `name` or `schema.name`.
    pub table: String,
    /// How long a looked-up app is reused before the database is asked again, so an app
    /// disabled or changed in the database takes effect within this. Unknown keys are cached
    /// for at most 5 s. While the database is down, cached apps are served past this.
    pub cache_ttl_seconds: u64,
    /// Connections in the pool.
    pub pool_size: u32,
    /// Bounds connecting, and waiting for a pooled connection; a lookup gets twice this.
    pub connect_timeout_ms: u64,
}

impl Default for SqlAppsConfig {
    fn default() -> Self {
        Self { url: String::new(), table: "apps".into(), cache_ttl_seconds: 60, pool_size: 5, connect_timeout_ms: 5000 }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppArray {
    pub apps: Vec<AppConfig>,
}

/// One app (tenant). Field names follow Sockudo's where they exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    pub key: String,
    pub secret: String,
    pub enabled: bool,
    /// Connections this app may hold on this node; 0 means no limit.
    pub max_connections: u64,
    pub enable_client_messages: bool,
    pub enable_user_authentication: bool,
    /// Sends `pusher_internal:subscription_count` to subscribers when a channel's count changes.
    pub enable_subscription_count: bool,
    /// Tells a signed-in socket when the users of its `user_data` `watchlist` come online or
    /// go offline (`pusher_internal:watchlist_events`), cluster-wide.
    pub enable_watchlist_events: bool,
    /// Users one sign-in may watch; a longer watchlist is refused with 4302.
    pub max_watchlist_size: usize,
    /// Per socket; 0 means no limit.
    pub max_client_events_per_second: u32,
    pub max_presence_members_per_channel: usize,
    pub max_presence_member_size_in_kb: usize,
    pub max_channel_name_length: usize,
    pub max_event_name_length: usize,
    pub max_event_payload_in_kb: usize,
    pub max_event_channels_at_once: usize,
    pub max_event_batch_size: usize,
    /// Seconds a socket has to `pusher:signin` before it is closed with 4009; 0 turns it off.
    pub user_authentication_timeout: u64,
    /// Browser origins allowed to connect (`https://app.example.com`, `*.example.com`, `*`);
    /// empty allows every origin. Others are refused with 4009.
    pub allowed_origins: Vec<String>,
    /// HTTP API events (`/events`, `/batch_events`) per second for this app; 0 means no limit.
    pub max_backend_events_per_second: u32,
    /// HTTP API read requests (`GET`) per second for this app; 0 means no limit.
    pub max_read_requests_per_second: u32,
    /// Where this app's backend hears about channel and presence changes.
    pub webhooks: Vec<WebhookConfig>,
}

/// One webhook target of an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub url: String,
    /// Event types sent to this URL (`channel_occupied`, `channel_vacated`, `member_added`,
    /// `member_removed`, `client_event`, `cache_miss`, `subscription_count`); empty means all.
    pub event_types: Vec<String>,
    /// Extra request headers.
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Webhook delivery: batching, the bounded queue, workers and retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Events of one app and URL within this window go in one request.
    pub batch_ms: u64,
    /// Events waiting to be sent, across apps; beyond it new events are dropped and counted.
    pub queue_size: usize,
    /// Events of one app waiting to be sent (queued, batching, in flight or waiting to be
    /// retried); beyond it that app's new events are dropped and counted, so that one app
    /// cannot fill `queue_size` for the others.
    pub max_queue_events_per_app: usize,
    /// The same share in bytes of serialised events, in KiB (one event larger than it is still
    /// accepted when the app has nothing else queued).
    pub max_queue_kb_per_app: usize,
    /// Concurrent senders.
    pub workers: usize,
    /// Requests of one app in flight at once (at most `workers`): a receiver that never
    /// answers holds this many senders, and the others keep serving the other apps.
    pub max_in_flight_per_app: usize,
    /// Timeout of one request.
    pub timeout_ms: u64,
    /// 5xx, timeouts and connection errors are retried with backoff for up to this long.
    pub max_retry_seconds: u64,
    /// PEM file of CA certificates trusted for `https://` receivers besides the system's
    /// roots (a private CA); empty: the system's roots only.
    pub ca_path: String,
    /// Where events wait (`WEBHOOK_QUEUE_DRIVER`): in this process (`memory`), or durably on
    /// the adapter's broker (`redis`: a Redis Stream with a consumer group; `nats`: a
    /// JetStream work-queue stream). Unset: the adapter's broker, `memory` on `local`.
    pub queue_driver: Option<QueueDriver>,
    /// A broker queue's entry that a node took and has not acknowledged for this long (the
    /// node died) is taken over by another node, or by a restarted one.
    pub claim_idle_ms: u64,
    /// Requests kept in the broker's dead-letter stream after their retries ran out (the
    /// oldest go first); `sockudo webhooks replay` queues them again.
    pub dead_letter_max: usize,
}

/// Where webhook events wait until their receiver has them (`webhooks.queue_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueDriver {
    Memory,
    Redis,
    Nats,
}

impl QueueDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueDriver::Memory => "memory",
            QueueDriver::Redis => "redis",
            QueueDriver::Nats => "nats",
        }
    }
}

impl WebhooksConfig {
    /// The queue driver in effect: the configured one, or the adapter's broker.
    pub fn queue(&self, adapter: AdapterDriver) -> QueueDriver {
        self.queue_driver.unwrap_or(match adapter {
            AdapterDriver::Local => QueueDriver::Memory,
            AdapterDriver::Redis => QueueDriver::Redis,
            AdapterDriver::Nats => QueueDriver::Nats,
        })
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            batch_ms: 50,
            queue_size: 10_000,
            max_queue_events_per_app: 1_000,
            max_queue_kb_per_app: 1_024,
            workers: 4,
            max_in_flight_per_app: 2,
            timeout_ms: 5_000,
            max_retry_seconds: 300,
            ca_path: String::new(),
            queue_driver: None,
            claim_idle_ms: 30_000,
            dead_letter_max: 10_000,
        }
    }
}

/// Rate limits that are not per app.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// New WebSocket connections per second from one IP address; 0 means no limit.
    pub connections_per_ip_per_second: u32,
    /// `memory` (this node) or `redis` (shared by the cluster, at `adapter.redis.url`).
    pub driver: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { connections_per_ip_per_second: 0, driver: "memory".into() }
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            key: String::new(),
            secret: String::new(),
            enabled: true,
            max_connections: 0,
            enable_client_messages: false,
            enable_user_authentication: false,
            enable_subscription_count: false,
            enable_watchlist_events: false,
            max_watchlist_size: 100,
            max_client_events_per_second: 100,
            max_presence_members_per_channel: 100,
            max_presence_member_size_in_kb: 2,
            max_channel_name_length: 200,
            max_event_name_length: 200,
            max_event_payload_in_kb: 100,
            max_event_channels_at_once: 100,
            max_event_batch_size: 10,
            user_authentication_timeout: 0,
            allowed_origins: Vec::new(),
            max_backend_events_per_second: 0,
            max_read_requests_per_second: 0,
            webhooks: Vec::new(),
        }
    }
}

/// The largest duration in seconds any setting takes (a year): far past any sane value, and far
/// from overflowing an `Instant` or a millisecond count.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;
/// The largest duration in milliseconds any setting takes (a year).
pub const MAX_MILLIS: u64 = MAX_SECONDS * 1000;
/// The largest size in KiB any setting takes (1 TiB), so that `* 1024` cannot overflow.
pub const MAX_KB: u64 = 1 << 30;
/// The largest size in MiB any setting takes (1 PiB).
pub const MAX_MB: u64 = 1 << 30;
/// The largest count or length any setting takes.
pub const MAX_COUNT: u64 = 100_000_000;

impl AppConfig {
    /// Checks what types alone cannot, for apps from the file and from a database alike: the
    /// id's form and limits above 0. The error names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(("id", "must be 1-64 characters of [A-Za-z0-9_-]".into()));
        }
        // Upper bounds too: a value that overflows when turned into bytes or a deadline (a
        // `u64::MAX` timeout panicked every session) is refused here, for files and rows alike.
        for (field, value, max) in [
            ("user_authentication_timeout", self.user_authentication_timeout, MAX_SECONDS),
            ("max_event_payload_in_kb", self.max_event_payload_in_kb as u64, MAX_KB),
            ("max_presence_member_size_in_kb", self.max_presence_member_size_in_kb as u64, MAX_KB),
            ("max_channel_name_length", self.max_channel_name_length as u64, MAX_COUNT),
            ("max_event_name_length", self.max_event_name_length as u64, MAX_COUNT),
            ("max_event_channels_at_once", self.max_event_channels_at_once as u64, MAX_COUNT),
            ("max_event_batch_size", self.max_event_batch_size as u64, MAX_COUNT),
            ("max_presence_members_per_channel", self.max_presence_members_per_channel as u64, MAX_COUNT),
            ("max_watchlist_size", self.max_watchlist_size as u64, MAX_COUNT),
        ] {
            if value > max {
                return Err((field, format!("{value} is above the maximum of {max}")));
            }
        }
        for (field, value) in [
            ("max_channel_name_length", self.max_channel_name_length),
            ("max_event_name_length", self.max_event_name_length),
            ("max_event_payload_in_kb", self.max_event_payload_in_kb),
            ("max_event_channels_at_once", self.max_event_channels_at_once),
            ("max_event_batch_size", self.max_event_batch_size),
            ("max_presence_member_size_in_kb", self.max_presence_member_size_in_kb),
        ] {
            if value == 0 {
                return Err((field, "must be above 0".into()));
            }
        }
        Ok(())
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 6001,
            debug: false,
            log_format: LogFormat::Text,
            log_level: None,
            activity_timeout: 120,
            pong_timeout: 30,
            max_connections: 0,
            max_memory_mb: 0,
            shutdown_grace_period: 10,
            subscription_count_debounce_ms: 100,
            watchlist_offline_grace_ms: 3_000,
            ssl: SslConfig::default(),
            cache: CacheConfig::default(),
            websocket: WebSocketConfig::default(),
            http_api: HttpApiConfig::default(),
            adapter: AdapterConfig::default(),
            metrics: MetricsConfig::default(),
            otel: OtelConfig::default(),
            webhooks: WebhooksConfig::default(),
            rate_limits: RateLimitConfig::default(),
            app_manager: AppManagerConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { ttl_seconds: 1800, max_mb_per_app: 64, max_mb: 512 }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_message_size_kb: 64,
            hard_max_message_size_kb: 256,
            max_queue_kb: 1024,
            read_buffer_size: 1024,
            write_buffer_size: 16 * 1024,
            write_timeout_seconds: 10,
            max_subscription_ops_per_second: 50,
        }
    }
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        Self { max_body_kb: 1024, timestamp_tolerance_seconds: 600, header_read_timeout_seconds: 10 }
    }
}

impl AdapterConfig {
    /// The broker prefix of the active driver: the cluster's name on a shared broker.
    pub fn prefix(&self) -> &str {
        match self.driver {
            AdapterDriver::Nats => &self.nats.prefix,
            AdapterDriver::Redis | AdapterDriver::Local => &self.redis.prefix,
        }
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            driver: AdapterDriver::Local,
            request_timeout_ms: 1000,
            node_timeout_ms: 5000,
            cluster_secret: None,
            redis: RedisConfig::default(),
            nats: NatsConfig::default(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "sockudo".into(),
            ca_path: String::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            cluster_nodes: Vec::new(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            prefix: "sockudo".into(),
            ca_path: String::new(),
            username: String::new(),
            password: String::new(),
            token: String::new(),
            credentials_path: String::new(),
            nkey_path: String::new(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            driver: "prometheus".into(),
            host: "0.0.0.0".into(),
            port: 9601,
            prometheus: PrometheusConfig::default(),
            ssl: SslConfig::default(),
        }
    }
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self { prefix: "sockudo_".into() }
    }
}

impl Default for AppManagerConfig {
    fn default() -> Self {
        Self { driver: "config".into(), array: AppArray::default(), sql: SqlAppsConfig::default() }
    }
}

impl Config {
    /// The effective log filter: `log_level`, else `debug`, else `info`.
    pub fn effective_log_level(&self) -> &str {
        match &self.log_level {
            Some(level) => level,
            None if self.debug => "debug",
            None => "info",
        }
    }

    /// Checks values that types alone cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        load::validate(self)
    }
}
