//! Apps from a PostgreSQL or MySQL/MariaDB table (`migrations/{postgres,mysql}/0001_apps.sql`)
//! through a `sqlx` pool and the TTL cache in `cache.rs`. A lookup that the database cannot
//! answer serves the cached app past its TTL, or fails with `LookupError` when there is none;
//! after a failure the database is left alone for a second, so a flood of lookups does not
//! queue up behind a dead one.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ColumnIndex, ConnectOptions, Decode, Row, Type};
use tokio::sync::{watch, Semaphore};

use crate::config::{mask_url_password, AppConfig, Config, ConfigError, SqlAppsConfig, WebhookConfig};
use crate::telemetry::logs::Sparse;
use crate::telemetry::Metrics;

use super::cache::{AppCache, By, Cached, MAX_ENTRIES};
use super::{App, LookupError};

/// Unknown keys and ids are cached for at most this long.
const MISS_TTL: Duration = Duration::from_secs(5);
/// After the database fails, and while one caller refreshes a stale entry, others wait this long
/// before asking the database again.
const RETRY: Duration = Duration::from_secs(1);

/// How a column is read: text, boolean, any integer (as `BIGINT`) or JSON (as text).
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Bool,
    Int,
    Json,
}

/// The columns read, in the order of `AppConfig`'s fields.
const COLUMNS: [(&str, Kind); 23] = [
    ("id", Kind::Text),
    ("key", Kind::Text),
    ("secret", Kind::Text),
    ("enabled", Kind::Bool),
    ("max_connections", Kind::Int),
    ("enable_client_messages", Kind::Bool),
    ("enable_user_authentication", Kind::Bool),
    ("enable_subscription_count", Kind::Bool),
    ("enable_watchlist_events", Kind::Bool),
    ("max_watchlist_size", Kind::Int),
    ("max_client_events_per_second", Kind::Int),
    ("max_presence_members_per_channel", Kind::Int),
    ("max_presence_member_size_in_kb", Kind::Int),
    ("max_channel_name_length", Kind::Int),
    ("max_event_name_length", Kind::Int),
    ("max_event_payload_in_kb", Kind::Int),
    ("max_event_channels_at_once", Kind::Int),
    ("max_event_batch_size", Kind::Int),
    ("user_authentication_timeout", Kind::Int),
    ("max_backend_events_per_second", Kind::Int),
    ("max_read_requests_per_second", Kind::Int),
    ("allowed_origins", Kind::Json),
    ("webhooks", Kind::Json),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    MySql,
}

impl Dialect {
    fn quote(self, name: &str) -> String {
        match self {
            Dialect::Postgres => format!("\"{name}\""),
            Dialect::MySql => format!("`{name}`"),
        }
    }

    /// `SELECT <every column, cast to what the decoder reads> FROM table WHERE <filter>`. The
    /// table name was validated as `[schema.]name` of plain identifiers by `config::validate`.
    fn select(self, table: &str, filter: &str) -> String {
        let columns: Vec<String> = COLUMNS
            .iter()
            .map(|&(name, kind)| {
                let q = self.quote(name);
                match (self, kind) {
                    (_, Kind::Bool) | (Dialect::Postgres, Kind::Text) => q,
                    (Dialect::Postgres, Kind::Int) => format!("CAST({q} AS BIGINT) AS {q}"),
                    (Dialect::Postgres, Kind::Json) => format!("CAST({q} AS TEXT) AS {q}"),
                    (Dialect::MySql, Kind::Int) => format!("CAST({q} AS SIGNED) AS {q}"),
                    // Binary collations (utf8mb4_bin) and MySQL's JSON type are not text to sqlx.
                    (Dialect::MySql, Kind::Text | Kind::Json) => format!("CAST({q} AS CHAR) AS {q}"),
                }
            })
            .collect();
        format!("SELECT {} FROM {table} WHERE {filter}", columns.join(", "))
    }

    fn select_by(self, table: &str, column: &str) -> String {
        let param = match self {
            Dialect::Postgres => "$1",
            Dialect::MySql => "?",
        };
        self.select(table, &format!("{} = {param}", self.quote(column)))
    }
}

enum Pool {
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// What a lookup answers.
type Lookup = Result<Option<Arc<App>>, LookupError>;

/// Where the lookups of one key wait for the answer of the one query running for it.
type Waiting = watch::Receiver<Option<Lookup>>;

/// Keys with a query in flight, at most (each is one waiting lookup's worth of memory).
const MAX_INFLIGHT: usize = 10_000;

/// What one lookup of a key that is not cached does.
enum Role {
    /// Another lookup of the key is querying: wait for its answer.
    Follow(Waiting),
    /// Query, and answer the lookups that wait.
    Lead(watch::Sender<Option<Lookup>>),
    /// Too many keys in flight: query without being waited for.
    Alone,
}

/// A lookup that others with the same key wait for; removed from `inflight` on drop.
struct Inflight<'a> {
    apps: &'a SqlApps,
    key: (By, String),
    tx: watch::Sender<Option<Lookup>>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.apps.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Why a fetch gave no app.
enum FetchError {
    /// The database did not answer (or answered with an error).
    Database(String),
    /// The row is there but unusable; the message names the column.
    Row(String),
    /// No pooled connection came free in time: this node is busy, the database is not down.
    Busy,
}

/// The SQL backend of `AppManager`.
pub(super) struct SqlApps {
    pool: Pool,
    table: String,
    url: String,
    by_key: String,
    by_id: String,
    probe: String,
    ttl: Duration,
    miss_ttl: Duration,
    lookup_timeout: Duration,
    metrics: Arc<Metrics>,
    cache: Mutex<AppCache>,
    /// Queries running or waiting for a pool connection, at most `pool_size`.
    permits: Semaphore,
    inflight: Mutex<HashMap<(By, String), Waiting>>,
}

impl SqlApps {
    /// Builds the pool without connecting (connections open on first use). Needs a Tokio runtime.
    pub(super) fn lazy(config: &Config, metrics: &Arc<Metrics>) -> Result<Self, ConfigError> {
        let sql: &SqlAppsConfig = &config.app_manager.sql;
        let bad_url =
            |e: sqlx::Error| ConfigError::new("app_manager.sql.url", format!("{}: {e}", mask_url_password(&sql.url)));
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::new("app_manager.driver", "the SQL app manager needs a Tokio runtime"));
        }
        let connect_timeout = Duration::from_millis(sql.connect_timeout_ms);
        let (dialect, pool) = match config.app_manager.driver.as_str() {
            "postgres" => {
                let options = PgConnectOptions::from_str(&sql.url).map_err(bad_url)?.disable_statement_logging();
                let pool = PgPoolOptions::new()
                    .max_connections(sql.pool_size)
                    .min_connections(0)
                    .acquire_timeout(connect_timeout)
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .connect_lazy_with(options);
                (Dialect::Postgres, Pool::Postgres(pool))
            }
            "mysql" => {
                let options = MySqlConnectOptions::from_str(&sql.url).map_err(bad_url)?.disable_statement_logging();
                let pool = MySqlPoolOptions::new()
                    .max_connections(sql.pool_size)
                    .min_connections(0)
                    .acquire_timeout(connect_timeout)
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .connect_lazy_with(options);
                (Dialect::MySql, Pool::MySql(pool))
            }
            other => {
                return Err(ConfigError::new("app_manager.driver", format!("{other:?} is not postgres or mysql")));
            }
        };
        let ttl = Duration::from_secs(sql.cache_ttl_seconds);
        Ok(Self {
            pool,
            table: sql.table.clone(),
            url: mask_url_password(&sql.url),
            by_key: dialect.select_by(&sql.table, "key"),
            by_id: dialect.select_by(&sql.table, "id"),
            probe: dialect.select(&sql.table, "1 = 0"),
            ttl,
            miss_ttl: ttl.min(MISS_TTL),
            lookup_timeout: connect_timeout * 2,
            metrics: metrics.clone(),
            cache: Mutex::new(AppCache::new(MAX_ENTRIES)),
            permits: Semaphore::new(sql.pool_size as usize),
            inflight: Mutex::default(),
        })
    }

    /// Builds the pool and checks that the database answers and that the table has the columns.
    pub(super) async fn connect(config: &Config, metrics: &Arc<Metrics>) -> Result<Self, ConfigError> {
        let apps = Self::lazy(config, metrics)?;
        let unreachable =
            |e: String| ConfigError::new("app_manager.sql.url", format!("cannot connect to {}: {e}", apps.url));
        let deadline = apps.lookup_timeout;
        let timed_out = || format!("no answer within {} ms", deadline.as_millis());
        match &apps.pool {
            Pool::Postgres(p) => {
                let conn = tokio::time::timeout(deadline, p.acquire()).await.map_err(|_| unreachable(timed_out()))?;
                drop(conn.map_err(|e| unreachable(e.to_string()))?);
            }
            Pool::MySql(p) => {
                let conn = tokio::time::timeout(deadline, p.acquire()).await.map_err(|_| unreachable(timed_out()))?;
                drop(conn.map_err(|e| unreachable(e.to_string()))?);
            }
        }
        let probe = async {
            match &apps.pool {
                Pool::Postgres(p) => sqlx::query(&apps.probe).fetch_optional(p).await.map(drop),
                Pool::MySql(p) => sqlx::query(&apps.probe).fetch_optional(p).await.map(drop),
            }
        };
        let bad_table = |e: String| {
            ConfigError::new(
                "app_manager.sql.table",
                format!("cannot read apps from {}: {e} (see migrations/ for the schema)", apps.table),
            )
        };
        match tokio::time::timeout(deadline, probe).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(bad_table(e.to_string())),
            Err(_) => return Err(bad_table(timed_out())),
        }
        tracing::info!(url = %apps.url, table = %apps.table, ttl_s = apps.ttl.as_secs(), "apps are read from the database");
        Ok(apps)
    }

    /// The app with this key or id: from the cache while fresh, else from the database, else
    /// (the database failing) from the cache however old.
    pub(super) async fn find(&self, by: By, needle: &str) -> Result<Option<Arc<App>>, LookupError> {
        let now = Instant::now();
        let stale = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let stale = match cache.get(by, needle, now, RETRY) {
                Cached::Fresh(app) => return Ok(app),
                Cached::Stale(app) => Some(app),
                Cached::Absent => None,
            };
            if cache.is_down(now) {
                return stale.ok_or(LookupError::Unavailable);
            }
            stale
        };
        self.coalesced(by, needle, stale).await
    }

    /// One database query per key at a time: concurrent lookups of a key that is not cached
    /// (a flood of one garbage key, or a popular app past its TTL) wait for the first one's
    /// answer instead of each running a query.
    async fn coalesced(&self, by: By, needle: &str, stale: Option<Option<Arc<App>>>) -> Lookup {
        let key = (by, needle.to_owned());
        let role = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(rx) => Role::Follow(rx.clone()),
                None if inflight.len() < MAX_INFLIGHT => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx);
                    Role::Lead(tx)
                }
                // Past the bound, lookups run alone (still limited by the query permits).
                None => Role::Alone,
            }
        };
        match role {
            Role::Lead(tx) => {
                // Dropped however this lookup ends (its client may leave mid-query): the entry
                // goes, and the waiting lookups are answered or let go.
                let leader = Inflight { apps: self, key, tx };
                let result = self.query(by, needle, stale).await;
                leader.tx.send_replace(Some(result.clone()));
                result
            }
            Role::Follow(mut rx) => match tokio::time::timeout(self.lookup_timeout, rx.wait_for(Option::is_some)).await
            {
                Ok(Ok(v)) => v.clone().unwrap_or(Err(LookupError::Unavailable)),
                // The first lookup was dropped (its client left) or took too long.
                _ => stale.ok_or(LookupError::Unavailable),
            },
            Role::Alone => self.query(by, needle, stale).await,
        }
    }

    /// Asks the database, under one of `pool_size` query permits. Waiting too long for a permit
    /// or a pooled connection means this node is flooded with lookups, not that the database
    /// is down: that lookup fails alone, and the store is not marked down for every other app.
    async fn query(&self, by: By, needle: &str, stale: Option<Option<Arc<App>>>) -> Lookup {
        let fetched = match tokio::time::timeout(self.lookup_timeout, self.permits.acquire()).await {
            Ok(Ok(_permit)) => match tokio::time::timeout(self.lookup_timeout, self.fetch(by, needle)).await {
                Ok(result) => result,
                Err(_) => Err(FetchError::Database(format!("no answer within {} ms", self.lookup_timeout.as_millis()))),
            },
            // Queued past the lookup timeout for a permit: this node is busy, as below.
            _ => Err(FetchError::Busy),
        };
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(Some(settings)) => Ok(Some(cache.fill(settings, &self.metrics, now, self.ttl))),
            Ok(None) => {
                if by == By::Id {
                    cache.remove(needle);
                }
                cache.fill_missing(by, needle, now, self.miss_ttl);
                Ok(None)
            }
            Err(FetchError::Row(problem)) => {
                tracing::error!(table = %self.table, problem = %problem, "an app row is invalid; the app is refused");
                cache.fill_missing(by, needle, now, self.miss_ttl);
                Ok(None)
            }
            Err(FetchError::Busy) => {
                static LOG: Sparse = Sparse::new();
                if let Some(suppressed) = LOG.admit() {
                    tracing::warn!(suppressed, "app lookups are queueing past the lookup timeout; this one is refused");
                }
                stale.ok_or(LookupError::Unavailable)
            }
            Err(FetchError::Database(error)) => {
                cache.mark_down(now + RETRY);
                let cached = stale.is_some();
                tracing::warn!(url = %self.url, error = %error, serving_cached = cached, "app lookup failed; cached apps keep working");
                stale.ok_or(LookupError::Unavailable)
            }
        }
    }

    async fn fetch(&self, by: By, needle: &str) -> Result<Option<AppConfig>, FetchError> {
        let sql = match by {
            By::Key => &self.by_key,
            By::Id => &self.by_id,
        };
        let db = |e: sqlx::Error| match e {
            // Every pooled connection was busy (a flood of lookups): this lookup fails alone.
            sqlx::Error::PoolTimedOut => FetchError::Busy,
            e => FetchError::Database(e.to_string()),
        };
        let settings = match &self.pool {
            Pool::Postgres(p) => match sqlx::query(sql).bind(needle).fetch_optional(p).await.map_err(db)? {
                Some(row) => Some(decode(&row).map_err(FetchError::Row)?),
                None => None,
            },
            Pool::MySql(p) => match sqlx::query(sql).bind(needle).fetch_optional(p).await.map_err(db)? {
                Some(row) => Some(decode(&row).map_err(FetchError::Row)?),
                None => None,
            },
        };
        // A case-insensitive collation could match another spelling; keys and ids are exact.
        Ok(settings.filter(|s| match by {
            By::Key => s.key == needle,
            By::Id => s.id == needle,
        }))
    }

    /// Looks up again every app that open connections hold, so that a changed or removed row
    /// reaches its sockets within about the cache's TTL (a fresh entry costs no query).
    pub(super) async fn refresh_in_use(&self) {
        let in_use = self.cache.lock().unwrap_or_else(|p| p.into_inner()).in_use();
        for app in in_use {
            let _ = self.find(By::Id, &app.id).await;
        }
    }

    /// The cached app with this key, without asking the database.
    pub(super) fn peek_key(&self, key: &str) -> Option<Arc<App>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).peek(By::Key, key)
    }

    /// How often [`SqlApps::refresh_in_use`] should run.
    pub(super) fn refresh_every(&self) -> Duration {
        (self.ttl / 2).max(Duration::from_millis(250))
    }

    /// The cached apps.
    pub(super) fn cached(&self) -> Vec<Arc<App>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).apps()
    }
}

/// A row as `AppConfig`: NULL means the default; a value out of range or invalid JSON is an
/// error naming the column.
fn decode<R: Row>(row: &R) -> Result<AppConfig, String>
where
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    String: Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    i64: Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database>,
    bool: Type<R::Database>,
{
    fn get<'r, R: Row, T>(row: &'r R, column: &str) -> Result<Option<T>, String>
    where
        for<'a> &'a str: ColumnIndex<R>,
        T: Decode<'r, R::Database> + Type<R::Database>,
    {
        row.try_get::<Option<T>, _>(column).map_err(|e| format!("{column}: {e}"))
    }
    fn int<T: TryFrom<i64>>(value: Option<i64>, default: T, column: &str) -> Result<T, String> {
        match value {
            None => Ok(default),
            Some(v) => T::try_from(v).map_err(|_| format!("{column}: {v} is out of range")),
        }
    }
    fn json<T: serde::de::DeserializeOwned + Default>(value: Option<String>, column: &str) -> Result<T, String> {
        match value.as_deref().map(str::trim) {
            None | Some("") | Some("null") => Ok(T::default()),
            Some(text) => serde_json::from_str(text).map_err(|e| format!("{column}: {e}")),
        }
    }
    let d = AppConfig::default();
    let text = |column: &str| -> Result<String, String> {
        get::<R, String>(row, column)?.filter(|s| !s.is_empty()).ok_or_else(|| format!("{column}: is empty"))
    };
    let flag =
        |column: &str, default: bool| -> Result<bool, String> { Ok(get::<R, bool>(row, column)?.unwrap_or(default)) };
    let number = |column: &str| get::<R, i64>(row, column);
    let settings = AppConfig {
        id: text("id")?,
        key: text("key")?,
        secret: text("secret")?,
        enabled: flag("enabled", d.enabled)?,
        max_connections: int(number("max_connections")?, d.max_connections, "max_connections")?,
        enable_client_messages: flag("enable_client_messages", d.enable_client_messages)?,
        enable_user_authentication: flag("enable_user_authentication", d.enable_user_authentication)?,
        enable_subscription_count: flag("enable_subscription_count", d.enable_subscription_count)?,
        enable_watchlist_events: flag("enable_watchlist_events", d.enable_watchlist_events)?,
        max_watchlist_size: int(number("max_watchlist_size")?, d.max_watchlist_size, "max_watchlist_size")?,
        max_client_events_per_second: int(
            number("max_client_events_per_second")?,
            d.max_client_events_per_second,
            "max_client_events_per_second",
        )?,
        max_presence_members_per_channel: int(
            number("max_presence_members_per_channel")?,
            d.max_presence_members_per_channel,
            "max_presence_members_per_channel",
        )?,
        max_presence_member_size_in_kb: int(
            number("max_presence_member_size_in_kb")?,
            d.max_presence_member_size_in_kb,
            "max_presence_member_size_in_kb",
        )?,
        max_channel_name_length: int(
            number("max_channel_name_length")?,
            d.max_channel_name_length,
            "max_channel_name_length",
        )?,
        max_event_name_length: int(number("max_event_name_length")?, d.max_event_name_length, "max_event_name_length")?,
        max_event_payload_in_kb: int(
            number("max_event_payload_in_kb")?,
            d.max_event_payload_in_kb,
            "max_event_payload_in_kb",
        )?,
        max_event_channels_at_once: int(
            number("max_event_channels_at_once")?,
            d.max_event_channels_at_once,
            "max_event_channels_at_once",
        )?,
        max_event_batch_size: int(number("max_event_batch_size")?, d.max_event_batch_size, "max_event_batch_size")?,
        user_authentication_timeout: int(
            number("user_authentication_timeout")?,
            d.user_authentication_timeout,
            "user_authentication_timeout",
        )?,
        max_backend_events_per_second: int(
            number("max_backend_events_per_second")?,
            d.max_backend_events_per_second,
            "max_backend_events_per_second",
        )?,
        max_read_requests_per_second: int(
            number("max_read_requests_per_second")?,
            d.max_read_requests_per_second,
            "max_read_requests_per_second",
        )?,
        allowed_origins: json::<Vec<String>>(get::<R, String>(row, "allowed_origins")?, "allowed_origins")?,
        webhooks: json::<Vec<WebhookConfig>>(get::<R, String>(row, "webhooks")?, "webhooks")?,
    };
    check(&settings)?;
    Ok(settings)
}

/// What `config::validate` checks of a configured app, for a row.
fn check(app: &AppConfig) -> Result<(), String> {
    app.check().map_err(|(field, message)| {
        if field == "id" {
            format!("id: {:?} {message}", app.id)
        } else {
            format!("{field} of app {:?}: {message}", app.id)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let pg = Dialect::Postgres.select_by("apps", "key");
        assert!(pg.starts_with("SELECT \"id\", \"key\", \"secret\", \"enabled\", CAST(\"max_connections\" AS BIGINT)"));
        assert!(pg.ends_with("FROM apps WHERE \"key\" = $1"), "{pg}");
        let my = Dialect::MySql.select_by("tenants.apps", "id");
        assert!(my.contains("CAST(`webhooks` AS CHAR) AS `webhooks`"));
        assert!(my.ends_with("FROM tenants.apps WHERE `id` = ?"), "{my}");
    }

    #[test]
    fn rows_are_checked() {
        let ok = AppConfig { id: "a-1".into(), key: "k".into(), secret: "s".into(), ..AppConfig::default() };
        assert!(check(&ok).is_ok());
        assert!(check(&AppConfig { id: "a b".into(), ..ok.clone() }).unwrap_err().starts_with("id:"));
        let huge = AppConfig { user_authentication_timeout: u64::MAX, ..ok.clone() };
        assert!(check(&huge).unwrap_err().contains("user_authentication_timeout"));
        let huge = AppConfig { max_event_payload_in_kb: usize::MAX, ..ok.clone() };
        assert!(check(&huge).unwrap_err().contains("max_event_payload_in_kb"));
        let zero = AppConfig { max_event_batch_size: 0, ..ok };
        assert!(check(&zero).unwrap_err().contains("max_event_batch_size"));
    }
}
