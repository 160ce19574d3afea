//! The environment layer: Sockudo's and the seed's variable names applied over the file.

use std::collections::HashMap;
use std::str::FromStr;

use super::load::ConfigError;
use super::{AdapterDriver, AppConfig, Config, LogFormat, QueueDriver};

fn get<'a>(e: &'a HashMap<String, String>, names: &[&str]) -> Option<(&'a str, String)> {
    names.iter().find_map(|n| e.get_key_value(*n).map(|(k, v)| (v.as_str(), k.clone())))
}

fn parse<T: FromStr>(value: &str, var: &str, what: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::new(var, format!("{value:?} is not {what}")))
}

fn parse_bool(value: &str, var: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(var, format!("{value:?} is not a boolean"))),
    }
}

/// The standard `OTEL_*` variables.
fn apply_otel(c: &mut Config, e: &HashMap<String, String>) -> Result<(), ConfigError> {
    let o = &mut c.otel;
    if let Some((v, k)) = get(e, &["OTEL_SDK_DISABLED"]) {
        o.sdk_disabled = parse_bool(v, &k)?;
    }
    let strings: [(&str, &mut String); 13] = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &mut o.endpoint),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &mut o.traces_endpoint),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &mut o.metrics_endpoint),
        ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &mut o.logs_endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", &mut o.protocol),
        ("OTEL_EXPORTER_OTLP_HEADERS", &mut o.headers),
        ("OTEL_SERVICE_NAME", &mut o.service_name),
        ("OTEL_RESOURCE_ATTRIBUTES", &mut o.resource_attributes),
        ("OTEL_TRACES_EXPORTER", &mut o.traces_exporter),
        ("OTEL_METRICS_EXPORTER", &mut o.metrics_exporter),
        ("OTEL_LOGS_EXPORTER", &mut o.logs_exporter),
        ("OTEL_TRACES_SAMPLER", &mut o.traces_sampler),
        ("OTEL_TRACES_SAMPLER_ARG", &mut o.traces_sampler_arg),
    ];
    for (var, slot) in strings {
        if let Some((v, _)) = get(e, &[var]) {
            *slot = v.trim().to_owned();
        }
    }
    if let Some((v, k)) = get(e, &["OTEL_METRIC_EXPORT_INTERVAL"]) {
        o.metric_export_interval_ms = parse(v, &k, "a number of milliseconds")?;
    }
    if let Some((v, k)) = get(e, &["OTEL_EXPORTER_OTLP_TIMEOUT"]) {
        o.export_timeout_ms = parse(v, &k, "a number of milliseconds")?;
    }
    Ok(())
}

/// TLS of the listeners (Sockudo's `SSL_*` names) and the webhook receivers' private CA.
fn apply_tls(c: &mut Config, e: &HashMap<String, String>) -> Result<(), ConfigError> {
    for (prefix, ssl) in [("SSL_", &mut c.ssl), ("METRICS_SSL_", &mut c.metrics.ssl)] {
        if let Some((v, k)) = get(e, &[&format!("{prefix}ENABLED")]) {
            ssl.enabled = parse_bool(v, &k)?;
        }
        for (name, slot) in [("CERT_PATH", &mut ssl.cert_path), ("KEY_PATH", &mut ssl.key_path)] {
            if let Some((v, _)) = get(e, &[&format!("{prefix}{name}")]) {
                *slot = v.trim().to_owned();
            }
        }
        if let Some((v, k)) = get(e, &[&format!("{prefix}WATCH_INTERVAL_MS")]) {
            ssl.watch_interval_ms = parse(v, &k, "a number of milliseconds")?;
        }
    }
    if let Some((v, _)) = get(e, &["WEBHOOKS_CA_PATH"]) {
        c.webhooks.ca_path = v.trim().to_owned();
    }
    Ok(())
}

/// Applies the environment over `c`.
pub(super) fn apply(c: &mut Config, e: &HashMap<String, String>) -> Result<(), ConfigError> {
    if let Some((v, _)) = get(e, &["HOST"]) {
        c.host = v.to_owned();
    }
    if let Some((v, k)) = get(e, &["PORT"]) {
        c.port = parse(v, &k, "a port number")?;
    }
    if let Some((v, k)) = get(e, &["DEBUG"]) {
        c.debug = parse_bool(v, &k)?;
    }
    if let Some((v, k)) = get(e, &["LOG_FORMAT", "LOG_OUTPUT_FORMAT"]) {
        c.log_format = match v.trim().to_ascii_lowercase().as_str() {
            "json" => LogFormat::Json,
            "text" | "human" => LogFormat::Text,
            _ => return Err(ConfigError::new(k, format!("{v:?} is not json or text"))),
        };
    }
    if let Some((v, _)) = get(e, &["LOG_LEVEL"]) {
        c.log_level = Some(v.trim().to_ascii_lowercase());
    }
    if let Some((v, k)) = get(e, &["ACTIVITY_TIMEOUT"]) {
        c.activity_timeout = parse(v, &k, "a number of seconds")?;
    }
    if let Some((v, k)) = get(e, &["SOCKUDO_MAX_CONNECTIONS"]) {
        c.max_connections = parse(v, &k, "a whole number")?;
    }
    if let Some((v, k)) = get(e, &["SOCKUDO_MAX_MEMORY_MB"]) {
        c.max_memory_mb = parse(v, &k, "a number of MiB")?;
    }
    if let Some((v, k)) = get(e, &["SHUTDOWN_GRACE_PERIOD"]) {
        c.shutdown_grace_period = parse(v, &k, "a number of seconds")?;
    }
    if let Some((v, k)) = get(e, &["METRICS_ENABLED"]) {
        c.metrics.enabled = parse_bool(v, &k)?;
    }
    if let Some((v, _)) = get(e, &["METRICS_DRIVER"]) {
        c.metrics.driver = v.trim().to_owned();
    }
    if let Some((v, _)) = get(e, &["METRICS_HOST"]) {
        c.metrics.host = v.to_owned();
    }
    if let Some((v, k)) = get(e, &["METRICS_PORT"]) {
        c.metrics.port = parse(v, &k, "a port number")?;
    }
    if let Some((v, _)) = get(e, &["PROMETHEUS_METRICS_PREFIX", "METRICS_PROMETHEUS_PREFIX"]) {
        c.metrics.prometheus.prefix = v.to_owned();
    }
    if let Some((v, k)) = get(e, &["ADAPTER_DRIVER"]) {
        c.adapter.driver = match v.trim().to_ascii_lowercase().as_str() {
            "local" => AdapterDriver::Local,
            "redis" => AdapterDriver::Redis,
            "nats" => AdapterDriver::Nats,
            _ => return Err(ConfigError::new(k, format!("{v:?} is not local, redis or nats"))),
        };
    }
    if let Some((v, k)) = get(e, &["WEBHOOK_QUEUE_DRIVER", "WEBHOOKS_QUEUE_DRIVER"]) {
        c.webhooks.queue_driver = Some(match v.trim().to_ascii_lowercase().as_str() {
            "memory" => QueueDriver::Memory,
            "redis" => QueueDriver::Redis,
            "nats" => QueueDriver::Nats,
            _ => return Err(ConfigError::new(k, format!("{v:?} is not memory, redis or nats"))),
        });
    }
    if let Some((v, k)) = get(e, &["WEBHOOKS_CLAIM_IDLE_MS"]) {
        c.webhooks.claim_idle_ms = parse(v, &k, "a number of milliseconds")?;
    }
    if let Some((v, _)) = get(e, &["ADAPTER_CLUSTER_SECRET"]) {
        // Taken as is (an empty value is refused by `validate`, not read as "no secret").
        c.adapter.cluster_secret = Some(v.to_owned());
    }
    if let Some((v, _)) = get(e, &["REDIS_URL"]) {
        c.adapter.redis.url = v.to_owned();
    }
    let list = |v: &str| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if let Some((v, _)) = get(e, &["REDIS_SENTINELS"]) {
        c.adapter.redis.sentinels = list(v);
    }
    if let Some((v, _)) = get(e, &["REDIS_CLUSTER_NODES"]) {
        c.adapter.redis.cluster_nodes = list(v);
    }
    if let Some((v, _)) = get(e, &["NATS_SERVERS"]) {
        c.adapter.nats.servers = list(v);
    }
    let (r, n) = (&mut c.adapter.redis, &mut c.adapter.nats);
    let strings: [(&str, &mut String); 8] = [
        ("REDIS_CA_PATH", &mut r.ca_path),
        ("REDIS_MASTER_NAME", &mut r.master_name),
        ("NATS_CA_PATH", &mut n.ca_path),
        ("NATS_USERNAME", &mut n.username),
        ("NATS_PASSWORD", &mut n.password),
        ("NATS_TOKEN", &mut n.token),
        ("NATS_CREDENTIALS_PATH", &mut n.credentials_path),
        ("NATS_NKEY_PATH", &mut n.nkey_path),
    ];
    for (var, slot) in strings {
        if let Some((v, _)) = get(e, &[var]) {
            *slot = v.trim().to_owned();
        }
    }
    if let Some((v, _)) = get(e, &["APP_MANAGER_DRIVER"]) {
        c.app_manager.driver = v.trim().to_ascii_lowercase();
    }
    if let Some((v, _)) = get(e, &["DATABASE_URL"]) {
        c.app_manager.sql.url = v.trim().to_owned();
    }
    apply_otel(c, e)?;
    apply_tls(c, e)?;
    let default_app = [
        get(e, &["SOCKUDO_DEFAULT_APP_ID"]),
        get(e, &["SOCKUDO_DEFAULT_APP_KEY"]),
        get(e, &["SOCKUDO_DEFAULT_APP_SECRET"]),
    ];
    if default_app.iter().any(Option::is_some) {
        // They override the first app, which in the embedded default is the default app.
        if c.app_manager.array.apps.is_empty() {
            c.app_manager.array.apps.push(AppConfig::default());
        }
        let app = &mut c.app_manager.array.apps[0];
        let [id, key, secret] = default_app;
        if let Some((v, _)) = id {
            app.id = v.to_owned();
        }
        if let Some((v, _)) = key {
            app.key = v.to_owned();
        }
        if let Some((v, _)) = secret {
            app.secret = v.to_owned();
        }
    }
    Ok(())
}
