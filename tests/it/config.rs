//! The binary's configuration handling: the embedded default, file layering with `${VAR}`
//! substitution, environment overrides, `--check-config`, and exit code 64 naming the key.

use std::process::{Command, Output};

fn sockudo(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sockudo"));
    cmd.args(args).env_remove("PORT").env_remove("HOST").env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sockudo")
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sockudo-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_prints_the_default_with_secrets_masked() {
    let o = sockudo(&["--check-config"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["port"], 6001);
    assert_eq!(v["metrics"]["port"], 9601);
    assert_eq!(v["app_manager"]["array"]["apps"][0]["key"], "app-key");
    assert!(!out.contains("app-secret"));
}

#[test]
fn file_then_env_layering_with_substitution() {
    let f = write(
        "layer.toml",
        "port = ${MY_PORT:-7001}\nlog_format = \"json\"\n[metrics]\nport = ${METRICS_P}\n[[app_manager.array.apps]]\nid = 42\nkey = \"k\"\nsecret = \"s\"\n",
    );
    let o = sockudo(
        &["--config", f.to_str().unwrap(), "--check-config"],
        &[("METRICS_P", "9999"), ("PORT", "7100"), ("SOCKUDO_DEFAULT_APP_KEY", "env-key")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["port"], 7100, "env wins over the file");
    assert_eq!(v["metrics"]["port"], 9999);
    assert_eq!(v["log_format"], "json");
    assert_eq!(v["app_manager"]["array"]["apps"][0]["id"], "42");
    assert_eq!(v["app_manager"]["array"]["apps"][0]["key"], "env-key");
    assert_eq!(v["app_manager"]["array"]["apps"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_values_exit_64_naming_the_key() {
    type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("PORT", "abc")], None, "PORT"),
        (vec![("PROMETHEUS_METRICS_PREFIX", "9bad")], None, "metrics.prometheus.prefix"),
        (vec![("METRICS_ENABLED", "maybe")], None, "METRICS_ENABLED"),
        (vec![("ADAPTER_DRIVER", "kafka")], None, "ADAPTER_DRIVER"),
        (vec![("WEBHOOK_QUEUE_DRIVER", "sqs")], None, "WEBHOOK_QUEUE_DRIVER"),
        (vec![], Some(r#"{"webhooks": {"queue_driver": "sqs"}}"#), "queue_driver"),
        (vec![], Some(r#"{"webhooks": {"claim_idle_ms": 18446744073709551615}}"#), "webhooks.claim_idle_ms"),
        (vec![], Some(r#"{"porto": 1}"#), "porto"),
        (vec![], Some(r#"{"activity_timeout": "soon"}"#), "activity_timeout"),
        (
            vec![],
            Some(
                r#"{"app_manager":{"array":{"apps":[{"id":"a","key":"k","secret":"s"},{"id":"b","key":"k","secret":"t"}]}}}"#,
            ),
            "apps[1].key",
        ),
        (
            vec![],
            Some(r#"{"app_manager":{"array":{"apps":[{"id":"a","key":"k","secret":"s","colour":1}]}}}"#),
            "colour",
        ),
        (vec![], Some(r#"{"port": ${UNSET_VAR_XYZ}}"#), "UNSET_VAR_XYZ"),
        // Values that fit their type but overflow as a deadline or a byte count (a u64::MAX
        // sign-in timeout panicked every session and leaked its slot).
        (
            vec![],
            Some(
                r#"{"app_manager":{"array":{"apps":[{"id":"a","key":"k","secret":"s","enable_user_authentication":true,"user_authentication_timeout":18446744073709551615}]}}}"#,
            ),
            "apps[0].user_authentication_timeout",
        ),
        (vec![], Some(r#"{"activity_timeout": 18446744073709551615}"#), "activity_timeout"),
        (vec![("ACTIVITY_TIMEOUT", "18446744073709551615")], None, "activity_timeout"),
        (vec![], Some(r#"{"websocket": {"max_queue_kb": 18446744073709551615}}"#), "websocket.max_queue_kb"),
        (vec![], Some(r#"{"webhooks": {"timeout_ms": 18446744073709551615}}"#), "webhooks.timeout_ms"),
        (vec![], Some(r#"{"cache": {"ttl_seconds": 18446744073709551615}}"#), "cache.ttl_seconds"),
    ];
    for (i, (env, file, needle)) in cases.into_iter().enumerate() {
        let mut args: Vec<String> = vec![];
        if let Some(text) = file {
            let p = write(&format!("bad{i}.json"), text);
            args.push("--config".into());
            args.push(p.to_string_lossy().into_owned());
        }
        args.push("--check-config".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sockudo(&argv, &env);
        assert_eq!(o.status.code(), Some(64), "case {i}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "case {i}: {err:?} should name {needle}");
    }
}

#[test]
fn port_in_use_exits_64() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = sockudo(&[], &[("HOST", "127.0.0.1"), ("PORT", &port), ("METRICS_ENABLED", "false")]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("port"), "{}", stderr(&o));
}

#[test]
fn sigterm_stops_the_binary_cleanly() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sockudo"))
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("METRICS_ENABLED", "false")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not stop within the grace period");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn shipped_example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    // tls.toml reads its certificate files at --check-config: give it a real pair.
    let ca = crate::support::tls::TestCa::new("examples");
    let pair = ca.issue("server");
    let (cert, key) = (pair.cert.display().to_string(), pair.key.display().to_string());
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let o = sockudo(
            &["--config", path.to_str().unwrap(), "--check-config"],
            &[
                ("SOCKUDO_APP_SECRET", "s3cret-value"),
                ("REDIS_URL", "redis://:pw@10.0.0.5:6379"),
                ("SSL_CERT_PATH", &cert),
                ("SSL_KEY_PATH", &key),
            ],
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!out.contains("s3cret-value") && !out.contains(":pw@"), "{name}: secrets masked");
        match name.as_str() {
            "redis-cluster.toml" => {
                assert_eq!(v["adapter"]["driver"], "redis");
                assert_eq!(v["adapter"]["redis"]["url"], "redis://:****@10.0.0.5:6379");
                assert_eq!(v["rate_limits"]["driver"], "redis");
            }
            "nats-cluster.toml" => assert_eq!(v["adapter"]["driver"], "nats"),
            "otlp.toml" => assert_eq!(v["metrics"]["driver"], "prometheus,otlp"),
            "tls.toml" => {
                assert_eq!(v["ssl"]["enabled"], true);
                assert_eq!(v["metrics"]["ssl"]["cert_path"], cert.as_str());
            }
            _ => {}
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        ["nats-cluster.toml", "otlp.toml", "redis-cluster.toml", "single-node.toml", "sockudo.json", "tls.toml"]
    );
}

/// `webhooks replay` has nothing to replay on the memory queue and cannot replay without its
/// broker: both are configuration errors (exit 64) naming the key; a broker that answers with
/// an empty dead-letter stream replays nothing.
#[test]
fn webhooks_replay_needs_a_broker_queue() {
    let o = sockudo(&["webhooks", "replay"], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("webhooks.queue_driver"), "{}", stderr(&o));
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{dead_port}");
    let o = sockudo(&["webhooks", "replay"], &[("WEBHOOK_QUEUE_DRIVER", "redis"), ("REDIS_URL", &url)]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("adapter.redis.url"), "{}", stderr(&o));
    let prefix = format!("replay-empty-{}", std::process::id());
    let f = write("replay.json", &format!(r#"{{"adapter": {{"redis": {{"prefix": "{prefix}"}}}}}}"#));
    let o = sockudo(
        &["webhooks", "replay", "--config", f.to_str().unwrap(), "--app", "app-id"],
        &[("WEBHOOK_QUEUE_DRIVER", "redis"), ("REDIS_URL", "redis://127.0.0.1:6379")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"replayed": 0}));
    let o = sockudo(&["webhooks", "frobnicate"], &[]);
    assert_eq!(o.status.code(), Some(64));
}
