//! Loading: embedded default, then the file, then the environment; then validation.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{env, AdapterDriver, Config, EMBEDDED_DEFAULT};

/// A configuration error: the key (or variable, or file) at fault and why. Startup prints it on
/// one line and exits with code 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

/// Loads the effective configuration from the embedded default, an optional file and the given
/// environment (passed in, so tests never touch the process environment), then validates it.
pub fn load(file: Option<&Path>, environment: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut merged: Value =
        serde_json::from_str(EMBEDDED_DEFAULT).map_err(|e| ConfigError::new("embedded default", e.to_string()))?;
    if let Some(path) = file {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&shown, e.to_string()))?;
        let text = if is_toml(path) {
            // Full-line TOML comments are left alone, so they may mention `${VAR}` freely.
            text.lines()
                .map(|line| {
                    if line.trim_start().starts_with('#') {
                        Ok(line.to_owned())
                    } else {
                        substitute(line, environment)
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|lines| lines.join("\n"))
        } else {
            substitute(&text, environment)
        }
        .map_err(|m| ConfigError::new(&shown, m))?;
        let overlay = parse_file(path, &text).map_err(|m| ConfigError::new(&shown, m))?;
        if !overlay.is_object() {
            return Err(ConfigError::new(&shown, "the top level must be an object"));
        }
        merge(&mut merged, overlay);
    }
    let mut config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "config".to_owned() } else { path };
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    env::apply(&mut config, environment)?;
    validate(&config)?;
    Ok(config)
}

fn is_toml(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

fn parse_file(path: &Path, text: &str) -> Result<Value, String> {
    if is_toml(path) {
        let v: toml::Value = toml::from_str(text).map_err(|e| format!("invalid TOML: {e}"))?;
        serde_json::to_value(v).map_err(|e| e.to_string())
    } else {
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// Objects merge key by key; anything else (arrays included) is replaced.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Replaces `${VAR}` and `${VAR:-default}`; an unset variable without a default is an error.
pub(crate) fn substitute(text: &str, environment: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| "unterminated ${ in the file".to_owned())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid variable reference ${{{inner}}}"));
        }
        match (environment.get(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("${{{name}}} is referenced but not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(crate) fn validate(c: &Config) -> Result<(), ConfigError> {
    let prefix = &c.metrics.prometheus.prefix;
    let valid_prefix = !prefix.is_empty()
        && prefix
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_alphabetic() || b == b'_' || b == b':' || (i > 0 && b.is_ascii_digit()));
    if !valid_prefix {
        return Err(ConfigError::new(
            "metrics.prometheus.prefix",
            format!("{prefix:?} must match [a-zA-Z_:][a-zA-Z0-9_:]*"),
        ));
    }
    if !c.metrics.driver.split(',').all(|d| matches!(d.trim(), "prometheus" | "otlp")) {
        return Err(ConfigError::new(
            "metrics.driver",
            format!("{:?} is not prometheus, otlp or prometheus,otlp", c.metrics.driver),
        ));
    }
    let o = &c.otel;
    if !matches!(o.protocol.as_str(), "grpc" | "http/protobuf" | "http/json") {
        return Err(ConfigError::new(
            "otel.protocol",
            format!("{:?} is not grpc, http/protobuf or http/json", o.protocol),
        ));
    }
    for (key, value) in [
        ("otel.traces_exporter", &o.traces_exporter),
        ("otel.metrics_exporter", &o.metrics_exporter),
        ("otel.logs_exporter", &o.logs_exporter),
    ] {
        if !matches!(value.as_str(), "otlp" | "none") {
            return Err(ConfigError::new(key, format!("{value:?} is not otlp or none")));
        }
    }
    if !matches!(
        o.traces_sampler.as_str(),
        "always_on"
            | "always_off"
            | "traceidratio"
            | "parentbased_always_on"
            | "parentbased_always_off"
            | "parentbased_traceidratio"
    ) {
        return Err(ConfigError::new(
            "otel.traces_sampler",
            format!("{:?} is not a supported sampler", o.traces_sampler),
        ));
    }
    if o.traces_sampler.ends_with("traceidratio")
        && !o.traces_sampler_arg.is_empty()
        && !o.traces_sampler_arg.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
    {
        return Err(ConfigError::new("otel.traces_sampler_arg", "must be a ratio between 0 and 1"));
    }
    if o.metric_export_interval_ms == 0 || o.export_timeout_ms == 0 {
        return Err(ConfigError::new("otel.metric_export_interval_ms", "intervals must be above 0"));
    }
    if let Some(level) = &c.log_level {
        if tracing_subscriber::EnvFilter::try_new(level).is_err() {
            return Err(ConfigError::new(
                "log_level",
                format!("{level:?} is not error|warn|info|debug|trace or a filter"),
            ));
        }
    }
    check_ranges(c)?;
    for (prefix, ssl) in [("ssl", &c.ssl), ("metrics.ssl", &c.metrics.ssl)] {
        // The files themselves are read (and their pair checked) by `tls::Certificate::load`.
        for (field, path) in [("cert_path", &ssl.cert_path), ("key_path", &ssl.key_path)] {
            if ssl.enabled && path.is_empty() {
                return Err(ConfigError::new(
                    format!("{prefix}.{field}"),
                    format!("is required when {prefix}.enabled"),
                ));
            }
        }
    }
    if c.activity_timeout == 0 {
        return Err(ConfigError::new("activity_timeout", "must be at least 1 second"));
    }
    if c.pong_timeout == 0 {
        return Err(ConfigError::new("pong_timeout", "must be at least 1 second"));
    }
    let ws = &c.websocket;
    if ws.max_message_size_kb == 0 || ws.hard_max_message_size_kb < ws.max_message_size_kb {
        return Err(ConfigError::new(
            "websocket.hard_max_message_size_kb",
            "must be at least websocket.max_message_size_kb, which must be above 0",
        ));
    }
    if ws.write_timeout_seconds == 0 {
        return Err(ConfigError::new("websocket.write_timeout_seconds", "must be at least 1 second"));
    }
    if ws.max_queue_kb == 0 {
        return Err(ConfigError::new("websocket.max_queue_kb", "must be above 0"));
    }
    if c.http_api.header_read_timeout_seconds == 0 {
        return Err(ConfigError::new("http_api.header_read_timeout_seconds", "must be at least 1 second"));
    }
    if c.http_api.max_body_kb == 0 {
        return Err(ConfigError::new("http_api.max_body_kb", "must be above 0"));
    }
    for (key, mb) in [("cache.max_mb_per_app", c.cache.max_mb_per_app), ("cache.max_mb", c.cache.max_mb)] {
        // 0 would mean "store nothing" as easily as "no bound"; neither is worth the ambiguity.
        if mb == 0 {
            return Err(ConfigError::new(key, "must be above 0 (MiB)"));
        }
    }
    if !matches!(c.rate_limits.driver.as_str(), "memory" | "redis") {
        return Err(ConfigError::new(
            "rate_limits.driver",
            format!("{:?} is not memory or redis", c.rate_limits.driver),
        ));
    }
    let a = &c.adapter;
    if a.request_timeout_ms == 0 || a.node_timeout_ms < 2000 {
        return Err(ConfigError::new(
            "adapter.node_timeout_ms",
            "request_timeout_ms must be above 0 and node_timeout_ms at least 2000 (two heartbeats)",
        ));
    }
    if a.driver == AdapterDriver::Redis || c.rate_limits.driver == "redis" {
        validate_redis(&a.redis)?;
    }
    if a.driver == AdapterDriver::Nats {
        validate_nats(&a.nats)?;
    }
    match a.driver {
        AdapterDriver::Redis if a.redis.url.is_empty() && a.redis.cluster_nodes.is_empty() => {
            return Err(ConfigError::new("adapter.redis.url", "is required with the redis driver"))
        }
        AdapterDriver::Nats if a.nats.servers.is_empty() => {
            return Err(ConfigError::new(
                "adapter.nats.servers",
                "at least one server is required with the nats driver",
            ))
        }
        _ => {}
    }
    check_cluster_secret(a.cluster_secret.as_deref())?;
    let m = &c.app_manager;
    match m.driver.as_str() {
        "config" => validate_config_apps(&m.array.apps),
        "postgres" | "mysql" => validate_sql(&m.driver, &m.sql),
        other => Err(ConfigError::new("app_manager.driver", format!("{other:?} is not config, postgres or mysql"))),
    }
}

/// Shortest `adapter.cluster_secret` accepted: 16 bytes, so that a typo'd or placeholder value
/// (`"x"`, `"changeme"`) is refused rather than signing a cluster with a guessable key.
pub const MIN_CLUSTER_SECRET_BYTES: usize = 16;

/// `adapter.cluster_secret`, when set: long enough, and without the leading or trailing
/// whitespace a secret file or a shell quote adds by accident (it would be part of the key, and
/// one node with a stray newline would silently leave the cluster).
fn check_cluster_secret(secret: Option<&str>) -> Result<(), ConfigError> {
    let Some(secret) = secret else { return Ok(()) };
    let key = "adapter.cluster_secret";
    if secret.is_empty() {
        return Err(ConfigError::new(key, "is empty; leave it unset to run without signed envelopes"));
    }
    if secret.len() < MIN_CLUSTER_SECRET_BYTES {
        return Err(ConfigError::new(
            key,
            format!("is {} bytes; at least {MIN_CLUSTER_SECRET_BYTES} are required", secret.len()),
        ));
    }
    if secret.trim() != secret {
        return Err(ConfigError::new(key, "has leading or trailing whitespace"));
    }
    Ok(())
}

/// Upper bounds of every duration, size and count of the file and the environment: each must
/// stay far from overflowing when it becomes a deadline, a byte count or a millisecond value.
fn check_ranges(c: &Config) -> Result<(), ConfigError> {
    use super::{MAX_COUNT, MAX_KB, MAX_MB, MAX_MILLIS, MAX_SECONDS};
    let (ws, api, a, w, o, sql) = (&c.websocket, &c.http_api, &c.adapter, &c.webhooks, &c.otel, &c.app_manager.sql);
    let table: [(&str, u64, u64); 34] = [
        ("activity_timeout", c.activity_timeout, MAX_SECONDS),
        ("pong_timeout", c.pong_timeout, MAX_SECONDS),
        ("shutdown_grace_period", c.shutdown_grace_period, MAX_SECONDS),
        ("subscription_count_debounce_ms", c.subscription_count_debounce_ms, MAX_MILLIS),
        ("watchlist_offline_grace_ms", c.watchlist_offline_grace_ms, MAX_MILLIS),
        ("max_memory_mb", c.max_memory_mb, MAX_MB),
        ("cache.ttl_seconds", c.cache.ttl_seconds, MAX_SECONDS),
        ("cache.max_mb_per_app", c.cache.max_mb_per_app, MAX_MB),
        ("cache.max_mb", c.cache.max_mb, MAX_MB),
        ("websocket.max_message_size_kb", ws.max_message_size_kb as u64, MAX_KB),
        ("websocket.hard_max_message_size_kb", ws.hard_max_message_size_kb as u64, MAX_KB),
        ("websocket.max_queue_kb", ws.max_queue_kb as u64, MAX_KB),
        ("websocket.read_buffer_size", ws.read_buffer_size as u64, MAX_KB * 1024),
        ("websocket.write_buffer_size", ws.write_buffer_size as u64, MAX_KB * 1024),
        ("websocket.write_timeout_seconds", ws.write_timeout_seconds, MAX_SECONDS),
        ("http_api.max_body_kb", api.max_body_kb as u64, MAX_KB),
        ("http_api.timestamp_tolerance_seconds", api.timestamp_tolerance_seconds, MAX_SECONDS),
        ("http_api.header_read_timeout_seconds", api.header_read_timeout_seconds, MAX_SECONDS),
        ("adapter.request_timeout_ms", a.request_timeout_ms, MAX_MILLIS),
        ("adapter.node_timeout_ms", a.node_timeout_ms, MAX_MILLIS),
        ("webhooks.batch_ms", w.batch_ms, MAX_MILLIS),
        ("webhooks.queue_size", w.queue_size as u64, MAX_COUNT),
        ("webhooks.max_queue_events_per_app", w.max_queue_events_per_app as u64, MAX_COUNT),
        ("webhooks.max_queue_kb_per_app", w.max_queue_kb_per_app as u64, MAX_KB),
        ("webhooks.workers", w.workers as u64, 10_000),
        ("webhooks.max_in_flight_per_app", w.max_in_flight_per_app as u64, 10_000),
        ("webhooks.timeout_ms", w.timeout_ms, MAX_MILLIS),
        ("webhooks.max_retry_seconds", w.max_retry_seconds, MAX_SECONDS),
        ("webhooks.claim_idle_ms", w.claim_idle_ms, MAX_MILLIS),
        ("webhooks.dead_letter_max", w.dead_letter_max as u64, MAX_COUNT),
        ("otel.metric_export_interval_ms", o.metric_export_interval_ms, MAX_MILLIS),
        ("otel.export_timeout_ms", o.export_timeout_ms, MAX_MILLIS),
        ("ssl.watch_interval_ms", c.ssl.watch_interval_ms, MAX_MILLIS),
        ("metrics.ssl.watch_interval_ms", c.metrics.ssl.watch_interval_ms, MAX_MILLIS),
    ];
    let sql_table = [
        ("app_manager.sql.cache_ttl_seconds", sql.cache_ttl_seconds, MAX_SECONDS),
        ("app_manager.sql.connect_timeout_ms", sql.connect_timeout_ms, MAX_MILLIS),
    ];
    for (key, value, max) in table.into_iter().chain(sql_table) {
        if value > max {
            return Err(ConfigError::new(key, format!("{value} is above the maximum of {max}")));
        }
    }
    Ok(())
}

/// `adapter.redis`: the mode's addresses are present. Files are read when connecting, where an
/// unreadable one is reported under its key too.
fn validate_redis(r: &super::RedisConfig) -> Result<(), ConfigError> {
    if r.cluster_nodes.is_empty() && !r.sentinels.is_empty() && r.master_name.is_empty() {
        return Err(ConfigError::new("adapter.redis.master_name", "is required with adapter.redis.sentinels"));
    }
    let lists = [("adapter.redis.sentinels", &r.sentinels), ("adapter.redis.cluster_nodes", &r.cluster_nodes)];
    for (key, urls) in lists {
        if let Some(bad) = urls.iter().find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://"))) {
            return Err(ConfigError::new(
                key,
                format!("{} must start with redis:// or rediss://", mask_url_password(bad)),
            ));
        }
    }
    Ok(())
}

/// `adapter.nats`: one way to sign in at most, and a username goes with a password.
fn validate_nats(n: &super::NatsConfig) -> Result<(), ConfigError> {
    let ways = [
        ("adapter.nats.username", !n.username.is_empty() || !n.password.is_empty()),
        ("adapter.nats.token", !n.token.is_empty()),
        ("adapter.nats.credentials_path", !n.credentials_path.is_empty()),
        ("adapter.nats.nkey_path", !n.nkey_path.is_empty()),
    ];
    let chosen: Vec<&str> = ways.iter().filter(|(_, set)| *set).map(|(key, _)| *key).collect();
    if chosen.len() > 1 {
        return Err(ConfigError::new(chosen[1], format!("only one of {} may be set", chosen.join(", "))));
    }
    if n.username.is_empty() != n.password.is_empty() {
        return Err(ConfigError::new("adapter.nats.password", "username and password go together"));
    }
    Ok(())
}

/// `app_manager.sql` for the `postgres` and `mysql` drivers (`array` is then ignored).
fn validate_sql(driver: &str, sql: &super::SqlAppsConfig) -> Result<(), ConfigError> {
    if sql.url.is_empty() {
        return Err(ConfigError::new(
            "app_manager.sql.url",
            format!("is required with the {driver} driver (or DATABASE_URL)"),
        ));
    }
    let schemes: &[&str] =
        if driver == "postgres" { &["postgres://", "postgresql://"] } else { &["mysql://", "mariadb://"] };
    if !schemes.iter().any(|s| sql.url.starts_with(s)) {
        return Err(ConfigError::new(
            "app_manager.sql.url",
            format!("{} must start with {} for the {driver} driver", mask_url_password(&sql.url), schemes.join(" or ")),
        ));
    }
    let identifier = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_alphabetic() || b == b'_' || (i > 0 && b.is_ascii_digit()))
    };
    let parts: Vec<&str> = sql.table.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| identifier(p)) {
        return Err(ConfigError::new(
            "app_manager.sql.table",
            format!("{:?} must be a name or schema.name of [A-Za-z_][A-Za-z0-9_]*", sql.table),
        ));
    }
    for (key, value) in [
        ("app_manager.sql.cache_ttl_seconds", sql.cache_ttl_seconds),
        ("app_manager.sql.pool_size", u64::from(sql.pool_size)),
        ("app_manager.sql.connect_timeout_ms", sql.connect_timeout_ms),
    ] {
        if value == 0 {
            return Err(ConfigError::new(key, "must be above 0"));
        }
    }
    Ok(())
}

/// `app_manager.array.apps` for the `config` driver.
fn validate_config_apps(apps: &[super::AppConfig]) -> Result<(), ConfigError> {
    if apps.is_empty() {
        return Err(ConfigError::new("app_manager.array.apps", "at least one app is required"));
    }
    let mut keys = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for (i, app) in apps.iter().enumerate() {
        let at = |f: &str| format!("app_manager.array.apps[{i}].{f}");
        for (field, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
            if value.is_empty() {
                return Err(ConfigError::new(at(field), "is required"));
            }
        }
        app.check().map_err(|(field, message)| ConfigError::new(at(field), message))?;
        if !keys.insert(app.key.as_str()) {
            return Err(ConfigError::new(at("key"), format!("duplicate app key {:?}", app.key)));
        }
        if !ids.insert(app.id.as_str()) {
            return Err(ConfigError::new(at("id"), format!("duplicate app id {:?}", app.id)));
        }
    }
    Ok(())
}

/// The configuration as JSON with every secret and URL password replaced, for `--check-config`.
pub fn mask_secrets(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    mask(&mut v);
    v
}

fn mask(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                // `null` stays visible: `--check-config` then shows that a secret is not set.
                let secret = k.ends_with("secret") && !val.is_null();
                if secret || k == "headers" || k.ends_with("password") || k.ends_with("token") {
                    *val = Value::String("********".into());
                } else {
                    mask(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask),
        // Any URL, whatever its key (`url`, `servers`, OTLP endpoints, webhook URLs, ...): a key
        // list would miss the next one added.
        Value::String(s) if s.contains("://") => *s = mask_url_password(s),
        _ => {}
    }
}

/// A URL with its credentials and query values masked, for logs and `--check-config`:
/// `redis://u:p@h` → `redis://u:****@h`, `nats://TOKEN@h` → `nats://****@h`,
/// `https://h/x?token=t` → `https://h/x?token=****`. A password may contain `@`: the userinfo
/// ends at the last `@` before the query.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_owned() };
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before_query, tail) = rest.split_at(query_at);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    out.push_str("://");
    match before_query.rfind('@') {
        Some(at) => {
            match before_query[..at].split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":****");
                }
                // A lone userinfo is a token (`nats://TOKEN@host`).
                None => out.push_str("****"),
            }
            out.push_str(&before_query[at..]);
        }
        None => out.push_str(before_query),
    }
    match tail.strip_prefix('?') {
        Some(query) => {
            let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
            out.push('?');
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) => format!("{k}=****"),
                    None => pair.to_owned(),
                })
                .collect();
            out.push_str(&masked.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn substitution() {
        let e = env(&[("A", "1")]);
        assert_eq!(substitute("x${A}y${B:-2}", &e).unwrap(), "x1y2");
        assert!(substitute("${B}", &e).unwrap_err().contains("B"));
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = load(None, &HashMap::new()).unwrap();
        assert_eq!(c.port, 6001);
        assert_eq!(c.metrics.port, 9601);
        assert_eq!(c.app_manager.array.apps[0].key, "app-key");
    }

    #[test]
    fn cache_bounds_are_validated() {
        let c = load(None, &HashMap::new()).unwrap();
        assert_eq!((c.cache.max_mb_per_app, c.cache.max_mb), (64, 512));
        assert_eq!(c.cache.max_bytes_per_app(), 64 << 20);
        for key in ["max_mb_per_app", "max_mb"] {
            for bad in [0, u64::MAX / 1024 + 1, u64::MAX] {
                let mut c = c.clone();
                match key {
                    "max_mb_per_app" => c.cache.max_mb_per_app = bad,
                    _ => c.cache.max_mb = bad,
                }
                assert_eq!(validate(&c).unwrap_err().key, format!("cache.{key}"), "{key} = {bad}");
            }
        }
    }

    #[test]
    fn per_app_webhook_shares_are_range_checked() {
        let mut c = load(None, &HashMap::new()).unwrap();
        c.webhooks.max_in_flight_per_app = 10_001;
        assert_eq!(c.validate().unwrap_err().key, "webhooks.max_in_flight_per_app");
        c.webhooks.max_in_flight_per_app = 2;
        c.webhooks.max_queue_kb_per_app = usize::MAX;
        assert_eq!(c.validate().unwrap_err().key, "webhooks.max_queue_kb_per_app");
    }

    #[test]
    fn cluster_secret_is_checked() {
        let mut c = load(None, &HashMap::new()).unwrap();
        assert_eq!(c.adapter.cluster_secret, None);
        for bad in ["", "short", "fifteen-bytes!!", " sixteen-bytes-and-more", "sixteen-bytes-and-more\n"] {
            c.adapter.cluster_secret = Some(bad.into());
            assert_eq!(validate(&c).unwrap_err().key, "adapter.cluster_secret", "{bad:?}");
        }
        c.adapter.cluster_secret = Some("sixteen-bytes-ok".into());
        assert!(validate(&c).is_ok());
        let from_env = load(None, &env(&[("ADAPTER_CLUSTER_SECRET", "from-the-environment")])).unwrap();
        assert_eq!(from_env.adapter.cluster_secret.as_deref(), Some("from-the-environment"));
        let empty = load(None, &env(&[("ADAPTER_CLUSTER_SECRET", "")])).unwrap_err();
        assert_eq!(empty.key, "adapter.cluster_secret");
    }

    #[test]
    fn masks() {
        // Every form a secret takes in a URL, one row each.
        let table = [
            ("redis://u:p@h:1/0", "redis://u:****@h:1/0"),
            ("redis://h:1", "redis://h:1"),
            ("redis://:onlypass@h:1", "redis://:****@h:1"),
            ("rediss://default:p%40ss@managed.example:6380", "rediss://default:****@managed.example:6380"),
            ("postgres://app:p@ss@word@db:5432/x", "postgres://app:****@db:5432/x"),
            ("nats://s3cr3tT0ken@127.0.0.1:4222", "nats://****@127.0.0.1:4222"),
            ("nats://user:pw@127.0.0.1:4222", "nats://user:****@127.0.0.1:4222"),
            ("https://otel:hunter2@collector:4318", "https://otel:****@collector:4318"),
            ("https://hooks.example/h?token=abc&sig=def", "https://hooks.example/h?token=****&sig=****"),
            ("https://u:p@hooks.example/h?token=abc#frag", "https://u:****@hooks.example/h?token=****#frag"),
            ("mysql://root@db/test?password=x", "mysql://****@db/test?password=****"),
            ("not a url", "not a url"),
        ];
        for (url, shown) in table {
            assert_eq!(mask_url_password(url), shown, "{url}");
        }
        let mut c = load(None, &HashMap::new()).unwrap();
        c.otel.endpoint = "https://otel:hunter2@collector:4318".into();
        c.otel.traces_endpoint = "https://collector:4318/v1/traces?api_key=k3y".into();
        c.adapter.nats.servers = vec!["nats://n4tst0ken@127.0.0.1:4222".into()];
        c.adapter.redis.url = "rediss://default:p@ss@redis.example:6380".into();
        c.adapter.cluster_secret = Some("cl0st3r-s3cr3t-0123456789".into());
        c.app_manager.array.apps[0].webhooks = vec![crate::config::WebhookConfig {
            url: "https://hooks.example/in?token=wh00k".into(),
            event_types: vec![],
            headers: [("Authorization".to_owned(), "Bearer b34rer".to_owned())].into(),
        }];
        let shown = mask_secrets(&c).to_string();
        for secret in ["app-secret", "hunter2", "k3y", "n4tst0ken", "p@ss", "ss@redis", "wh00k", "b34rer", "cl0st3r"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(mask_secrets(&c)["adapter"]["cluster_secret"], "********");
        // An unset secret is shown as unset, not as a mask that suggests one is configured.
        c.adapter.cluster_secret = None;
        assert_eq!(mask_secrets(&c)["adapter"]["cluster_secret"], Value::Null);
        assert!(shown.contains("redis.example:6380") && shown.contains("hooks.example/in?token=****"), "{shown}");
    }
}
