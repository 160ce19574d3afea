//! Apps from SQL: one scenario written over an [`Engine`] and run against the PostgreSQL and the
//! MariaDB that the machine runs. Each run creates a database of its own
//! (`sockudo_it_<pid>_<random>`), applies `migrations/<engine>` with sqlx's migrator (what
//! `sqlx migrate run` does), inserts apps, drives a real server and real clients, drops the
//! database in the middle to check that cached apps keep working, and drops it again at the end
//! (also when the test fails).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use sockudo::app::{AppManager, LookupError};
use sockudo::config::{self, Config};
use sockudo::telemetry::{Metrics, Telemetry};
use sqlx::migrate::Migrator;
use sqlx::{Connection, Executor};

use crate::support::process::free_port;
use crate::support::*;

#[derive(Clone, Copy, Debug)]
enum Engine {
    Postgres,
    MariaDb,
}

impl Engine {
    /// The server every test run creates its database on.
    fn server_url(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres://postgres@127.0.0.1:5432",
            Engine::MariaDb => "mysql://root@127.0.0.1:3306",
        }
    }

    fn driver(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MariaDb => "mysql",
        }
    }

    /// `key` is a reserved word in MySQL.
    fn key_column(self) -> &'static str {
        match self {
            Engine::Postgres => "key",
            Engine::MariaDb => "`key`",
        }
    }
}

/// Runs one statement on `url` with a connection of its own.
async fn exec(engine: Engine, url: &str, sql: &str) {
    let run = async {
        match engine {
            Engine::Postgres => {
                let mut c = sqlx::PgConnection::connect(url).await?;
                c.execute(sql).await.map(drop)
            }
            Engine::MariaDb => {
                let mut c = sqlx::MySqlConnection::connect(url).await?;
                c.execute(sql).await.map(drop)
            }
        }
    };
    let result: Result<(), sqlx::Error> = tokio::time::timeout(WAIT, run).await.expect("database answers in time");
    result.unwrap_or_else(|e| panic!("{engine:?}: {sql}: {e}"));
}

/// A database of this test run, dropped on drop.
struct TestDb {
    engine: Engine,
    name: String,
    url: String,
}

impl TestDb {
    async fn create(engine: Engine, migrate: bool) -> Self {
        let name = format!("sockudo_it_{}_{}", std::process::id(), fastrand::u32(..));
        let admin = match engine {
            Engine::Postgres => format!("{}/test", engine.server_url()),
            Engine::MariaDb => format!("{}/test", engine.server_url()),
        };
        exec(engine, &admin, &format!("CREATE DATABASE {name}")).await;
        let db = Self { engine, url: format!("{}/{name}", engine.server_url()), name };
        if migrate {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(engine.driver());
            let migrator = Migrator::new(dir).await.expect("migrations");
            match engine {
                Engine::Postgres => {
                    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
                    migrator.run(&mut c).await.expect("migrate postgres");
                }
                Engine::MariaDb => {
                    let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
                    migrator.run(&mut c).await.expect("migrate mariadb");
                }
            }
        }
        db
    }

    async fn exec(&self, sql: &str) {
        exec(self.engine, &self.url, sql).await;
    }

    async fn insert_app(&self, id: &str, key: &str, secret: &str, extra: &[(&str, &str)]) {
        let (mut columns, mut values) = (
            vec!["id", self.engine.key_column(), "secret"],
            vec![format!("'{id}'"), format!("'{key}'"), format!("'{secret}'")],
        );
        for (column, value) in extra {
            columns.push(*column);
            values.push(value.to_string());
        }
        self.exec(&format!("INSERT INTO apps ({}) VALUES ({})", columns.join(", "), values.join(", "))).await;
    }

    fn drop_statement(&self) -> String {
        match self.engine {
            // Also ends the server's pooled connections.
            Engine::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            Engine::MariaDb => format!("DROP DATABASE IF EXISTS {}", self.name),
        }
    }

    async fn drop_now(&self) {
        exec(self.engine, &format!("{}/test", self.engine.server_url()), &self.drop_statement()).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Async work in `drop`: a thread with a runtime of its own, joined.
        let (engine, sql) = (self.engine, self.drop_statement());
        let admin = format!("{}/test", engine.server_url());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(exec(engine, &admin, &sql));
            }
        })
        .join();
    }
}

async fn sql_server(engine: Engine, url: &str) -> TestServer {
    let (driver, url) = (engine.driver().to_owned(), url.to_owned());
    TestServer::start_with(move |c| {
        c.app_manager.driver = driver;
        c.app_manager.sql.url = url;
        c.app_manager.sql.cache_ttl_seconds = 1;
        c.app_manager.sql.pool_size = 2;
        c.app_manager.sql.connect_timeout_ms = 500;
    })
    .await
}

/// The first frame and the close code of a refused connection.
async fn refused(server: &TestServer, key: &str) -> (u64, Closed) {
    let mut ws = Client::open(&server.ws_url(key, "protocol=7")).await;
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["event"], "pusher:error", "{key}: {frame}");
    let code = frame["data"]["code"].as_u64().unwrap();
    let mut c = Client { ws, socket_id: String::new() };
    (code, c.closed().await)
}

/// Whether a connection with `key` is accepted (`Ok`) or refused with a code (`Err`).
async fn try_connect(server: &TestServer, key: &str) -> Result<Client, u64> {
    let mut ws = Client::open(&server.ws_url(key, "protocol=7")).await;
    let first = next_json(&mut ws).await;
    if first["event"] == "pusher:connection_established" {
        let socket_id = data(&first)["socket_id"].as_str().unwrap().to_owned();
        Ok(Client { ws, socket_id })
    } else {
        Err(first["data"]["code"].as_u64().unwrap_or(0))
    }
}

async fn publish(server: &TestServer, id: &str, key: &str, secret: &str, channel: &str) -> (u16, serde_json::Value) {
    let body = json!({"name": "ev", "channel": channel, "data": "hi"});
    server.api_as(id, key, secret, "POST", "/events", &[], Some(body)).await
}

async fn apps_from_sql(engine: Engine) {
    let db = TestDb::create(engine, true).await;
    db.insert_app(
        "sql-app",
        "sql-key",
        "sql-secret",
        &[("enable_client_messages", "TRUE"), ("allowed_origins", r#"'["*"]'"#), ("webhooks", "'[]'")],
    )
    .await;
    db.insert_app("other-app", "other-key", "other-secret", &[]).await;
    db.insert_app("quota-app", "quota-key", "quota-secret", &[("max_connections", "1")]).await;
    db.insert_app("bad-app", "bad-key", "bad-secret", &[("max_event_batch_size", "0")]).await;
    let server = sql_server(engine, &db.url).await;

    // An app from the database connects and publishes through the signed API.
    let mut client = server.client_of("sql-key").await;
    client.subscribe("orders").await;
    assert_eq!(publish(&server, "sql-app", "sql-key", "sql-secret", "orders").await.0, 200);
    let ev = client.expect_for("ev", "orders").await;
    assert_eq!(ev["data"], "hi");
    let (status, body) = server.api_as("sql-app", "sql-key", "wrong", "POST", "/events", &[], None).await;
    assert_eq!(status, 401, "{body}");

    // Unknown keys and ids are refused, and so is an invalid row.
    assert_eq!(refused(&server, "nope").await, (4001, Closed::Code(4001)));
    assert_eq!(refused(&server, "SQL-KEY").await, (4001, Closed::Code(4001)), "keys are case-sensitive");
    assert_eq!(refused(&server, "bad-key").await, (4001, Closed::Code(4001)));
    assert_eq!(publish(&server, "nope", "nope", "nope", "orders").await.0, 404);

    // The quota counts connections across a refill with changed settings.
    let holder = server.client_of("quota-key").await;
    db.exec("UPDATE apps SET max_client_events_per_second = 50 WHERE id = 'quota-app'").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(refused(&server, "quota-key").await, (4004, Closed::Code(4004)));
    holder.close().await;
    let again = server.client_of("quota-key").await;
    again.close().await;

    // A secret rotated in the database signs the open socket's next channel auth (within the
    // cache's TTL), and the old secret stops working for it.
    db.exec("UPDATE apps SET secret = 'rotated' WHERE id = 'sql-app'").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let channel = format!("private-rotation-{attempt}");
        let sig = sockudo::auth::sign("rotated", &format!("{}:{channel}", client.socket_id));
        client
            .send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": format!("sql-key:{sig}")}}))
            .await;
        let reply = loop {
            let v = client.next().await;
            if v["channel"] == channel.as_str() {
                break v;
            }
        };
        if reply["event"] == "pusher_internal:subscription_succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "the open socket never took the rotated secret: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sig = sockudo::auth::sign("sql-secret", &format!("{}:private-old-secret", client.socket_id));
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-old-secret", "auth": format!("sql-key:{sig}")}})).await;
    client.expect_for("pusher:subscription_error", "private-old-secret").await;
    db.exec("UPDATE apps SET secret = 'sql-secret' WHERE id = 'sql-app'").await;
    let back = eventually(Duration::from_secs(5), || async {
        publish(&server, "sql-app", "sql-key", "sql-secret", "orders").await.0 == 200
    })
    .await;
    assert!(back, "the secret was not rotated back");
    client.expect_for("ev", "orders").await;

    // An app disabled in the database is refused once its cache entry expires, and its open
    // sockets are closed with 4003 within about the same time.
    db.exec("UPDATE apps SET enabled = FALSE WHERE id = 'sql-app'").await;
    let refused_after_ttl =
        eventually(Duration::from_secs(5), || async { matches!(try_connect(&server, "sql-key").await, Err(4003)) })
            .await;
    assert!(refused_after_ttl, "the disabled app was still accepted");
    assert_eq!(publish(&server, "sql-app", "sql-key", "sql-secret", "orders").await.0, 403);
    assert_eq!(client.closed().await, Closed::Code(4003), "the open socket of the disabled app is closed");
    // Enabling the app again lets new ones in.
    db.exec("UPDATE apps SET enabled = TRUE WHERE id = 'sql-app'").await;
    let enabled = eventually(Duration::from_secs(5), || async { try_connect(&server, "sql-key").await.is_ok() }).await;
    assert!(enabled, "the re-enabled app was still refused");
    let mut client = server.client_of("sql-key").await;
    client.subscribe("orders").await;

    // The database goes away: cached apps keep connecting and publishing past their TTL,
    // others are refused with 4001 (WebSocket) or an error status (API), and nothing panics.
    server.client_of("other-key").await.close().await;
    db.drop_now().await;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let c = server.client_of("sql-key").await;
        c.close().await;
        assert_eq!(publish(&server, "sql-app", "sql-key", "sql-secret", "orders").await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ev = client.expect_for("ev", "orders").await;
    assert_eq!(ev["data"], "hi");
    server.client_of("other-key").await.close().await;
    // The store is down: a retryable 41xx, not 4001 (which tells clients to give up).
    assert_eq!(refused(&server, "never-seen").await, (4102, Closed::Code(4102)));
    let (status, body) = publish(&server, "never-seen", "never-seen", "s", "orders").await;
    assert_eq!((status, body), (503, serde_json::json!({"error": "app lookup failed"})));
    let (status, _) = server.raw_request("GET", "/up", None).await;
    assert_eq!(status, 200);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn postgres_apps() {
    apps_from_sql(Engine::Postgres).await;
}

#[tokio::test]
async fn mariadb_apps() {
    apps_from_sql(Engine::MariaDb).await;
}

fn metrics() -> Arc<Metrics> {
    let mut c = test_config();
    c.metrics.enabled = false;
    Telemetry::new(&c, 0, "apps-sql").unwrap().metrics.clone()
}

fn sql_config(engine: Engine, url: &str) -> Config {
    let mut c = test_config();
    c.app_manager.driver = engine.driver().into();
    c.app_manager.sql.url = url.into();
    c.app_manager.sql.connect_timeout_ms = 300;
    c.validate().expect("valid");
    c
}

/// An unreachable database, or one without the table, is a startup error naming the key, with
/// the password masked; a lazily built manager refuses lookups with an error instead of a panic.
async fn startup_errors(engine: Engine) {
    let port = free_port();
    let scheme = engine.server_url().split("://").next().unwrap();
    let url = format!("{scheme}://user:hunter2@127.0.0.1:{port}/apps");
    let err = AppManager::connect(&sql_config(engine, &url), &metrics()).await.err().expect("an error");
    assert_eq!(err.key, "app_manager.sql.url", "{err}");
    assert!(err.to_string().contains("user:****@"), "{err}");
    assert!(!err.to_string().contains("hunter2"), "password leaked: {err}");

    let lazy = AppManager::from_config(&sql_config(engine, &url), &metrics());
    assert!(matches!(lazy.lookup_by_key("k").await, Err(LookupError::Unavailable)));
    assert!(lazy.find_by_id("k").await.is_none());
    assert!(lazy.all().is_empty());

    let empty = TestDb::create(engine, false).await;
    let err = AppManager::connect(&sql_config(engine, &empty.url), &metrics()).await.err().expect("an error");
    assert_eq!(err.key, "app_manager.sql.table", "{err}");

    let db = TestDb::create(engine, true).await;
    db.insert_app("a1", "k1", "s1", &[]).await;
    let apps = AppManager::connect(&sql_config(engine, &db.url), &metrics()).await.expect("connects");
    let app = apps.lookup_by_id("a1").await.unwrap().expect("found");
    assert_eq!((app.key.as_str(), app.secret()), ("k1", "s1"));
    assert_eq!(app.settings.max_event_batch_size, 10, "defaults");
    let same = apps.find_by_key("k1").await.expect("cached by key too");
    assert!(Arc::ptr_eq(&app, &same), "one App per fill");
    assert_eq!(apps.all().len(), 1);
    assert!(matches!(apps.lookup_by_key("k2").await, Ok(None)));
}

#[tokio::test]
async fn postgres_startup_errors() {
    startup_errors(Engine::Postgres).await;
}

#[tokio::test]
async fn mariadb_startup_errors() {
    startup_errors(Engine::MariaDb).await;
}

#[test]
fn config_keys_and_environment() {
    let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let c = config::load(None, &env(&[])).unwrap();
    assert_eq!(c.app_manager.driver, "config");
    assert_eq!(
        (c.app_manager.sql.table.as_str(), c.app_manager.sql.cache_ttl_seconds, c.app_manager.sql.pool_size),
        ("apps", 60, 5)
    );

    let c = config::load(
        None,
        &env(&[("APP_MANAGER_DRIVER", "postgres"), ("DATABASE_URL", "postgres://u:hunter2@db:5432/sockudo")]),
    )
    .unwrap();
    assert_eq!(c.app_manager.driver, "postgres");
    assert_eq!(c.app_manager.sql.url, "postgres://u:hunter2@db:5432/sockudo");
    let shown = config::mask_secrets(&c).to_string();
    assert!(!shown.contains("hunter2") && shown.contains("u:****@db"), "{shown}");

    let key_of = |pairs: &[(&str, &str)]| config::load(None, &env(pairs)).unwrap_err().key;
    assert_eq!(key_of(&[("APP_MANAGER_DRIVER", "redis")]), "app_manager.driver");
    assert_eq!(key_of(&[("APP_MANAGER_DRIVER", "mysql")]), "app_manager.sql.url");
    assert_eq!(key_of(&[("APP_MANAGER_DRIVER", "mysql"), ("DATABASE_URL", "postgres://h/db")]), "app_manager.sql.url");

    let mut c = sql_config(Engine::Postgres, "postgresql://h/db");
    for (table, ok) in [("apps", true), ("tenant.apps", true), ("apps; DROP TABLE x", false), ("a.b.c", false)] {
        c.app_manager.sql.table = table.into();
        assert_eq!(c.validate().is_ok(), ok, "{table}");
    }
    c.app_manager.sql.table = "apps".into();
    c.app_manager.sql.cache_ttl_seconds = 0;
    assert_eq!(c.validate().unwrap_err().key, "app_manager.sql.cache_ttl_seconds");
    // With a SQL driver the file's app list is not used, so it may be empty.
    c.app_manager.sql.cache_ttl_seconds = 1;
    c.app_manager.array.apps.clear();
    assert!(c.validate().is_ok());
}

#[tokio::test]
async fn unreachable_database_at_startup_exits_64_with_the_password_masked() {
    let port = crate::support::process::free_port();
    for (driver, scheme) in [("postgres", "postgres"), ("mysql", "mysql")] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sockudo"))
            .env("HOST", "127.0.0.1")
            .env("PORT", crate::support::process::free_port().to_string())
            .env("METRICS_ENABLED", "false")
            .env("APP_MANAGER_DRIVER", driver)
            .env("DATABASE_URL", format!("{scheme}://user:hunter2@127.0.0.1:{port}/apps"))
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out).await.unwrap().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{driver}: {err}");
        assert!(err.contains("app_manager.sql.url"), "{err}");
        assert!(!err.contains("hunter2"), "password leaked: {err}");
    }
}

/// A flood of WebSocket upgrades with garbage keys (hundreds at once, distinct and repeated)
/// against a database with two pooled connections: every one is refused with 4001 (misses are
/// cached, lookups of one key coalesced, queries bounded by the pool), the store is never
/// marked down, and a real app that was never looked up before connects at once afterwards.
async fn garbage_key_flood(engine: Engine) {
    let db = TestDb::create(engine, true).await;
    db.insert_app("real-app", "real-key", "real-secret", &[]).await;
    db.insert_app("second-app", "second-key", "second-secret", &[]).await;
    let server = sql_server(engine, &db.url).await;
    let port = server.port;
    let attempts = (0..600).map(|i| {
        // Half distinct keys, half one repeated key (coalesced into one query at a time).
        let key = if i % 2 == 0 { format!("garbage-{i}") } else { "garbage-same".to_owned() };
        async move {
            let url = format!("ws://127.0.0.1:{port}/app/{key}?protocol=7");
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
            next_json(&mut ws).await["data"]["code"].as_u64()
        }
    });
    let codes: Vec<Option<u64>> = futures_util::stream::iter(attempts).buffer_unordered(200).collect().await;
    // 4001, or under this much load the retryable 4102 for lookups that waited past the lookup
    // timeout for a query permit (this node is busy; the store is not down).
    let refused_4001 = codes.iter().filter(|c| **c == Some(4001)).count();
    let busy = codes.iter().filter(|c| **c == Some(4102)).count();
    assert_eq!(refused_4001 + busy, codes.len(), "{codes:?}");
    assert!(refused_4001 >= codes.len() / 2, "{refused_4001} of {} got 4001", codes.len());
    println!("{} garbage upgrades: {refused_4001} got 4001, {busy} got 4102", codes.len());
    // Neither app was looked up before: had the flood marked the store down, they would get 4102.
    for key in ["real-key", "second-key"] {
        let real = try_connect(&server, key).await;
        assert!(real.is_ok(), "{key} was refused after the flood: {:?}", real.err());
    }
    let (status, _) = server.raw_request("GET", "/up", None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn postgres_garbage_key_flood() {
    garbage_key_flood(Engine::Postgres).await;
}

#[tokio::test]
async fn mariadb_garbage_key_flood() {
    garbage_key_flood(Engine::MariaDb).await;
}
