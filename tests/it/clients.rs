//! The real Pusher clients against an in-process server: pusher-js, laravel-echo and the
//! `pusher` Node SDK (`node --test tests/clients/`), and Python's `pusher` SDK.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use crate::support::*;

pub(crate) fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

pub(crate) async fn run(mut cmd: Command, what: &str) {
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{what} finished within 240 s"))
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    println!("{what}:\n{stdout}\n{stderr}");
}

pub(crate) fn with_server_env(cmd: &mut Command, server: &TestServer) {
    cmd.env("SOCKUDO_HOST", "127.0.0.1")
        .env("SOCKUDO_PORT", server.port.to_string())
        .env("SOCKUDO_APP_ID", APP_ID)
        .env("SOCKUDO_APP_KEY", KEY)
        .env("SOCKUDO_APP_SECRET", SECRET)
        .env("SOCKUDO_PY_APP_ID", "12345")
        .env("SOCKUDO_PY_APP_KEY", "py-key")
        .env("SOCKUDO_PY_APP_SECRET", "py-secret");
}

#[tokio::test]
async fn node_clients_pusher_js_laravel_echo_and_the_pusher_sdk() {
    assert!(
        clients_dir().join("node_modules/pusher-js").exists(),
        "run `npm ci --prefix tests/clients` first (.ci/run does)"
    );
    let server = TestServer::start().await;
    let mut cmd = Command::new("node");
    cmd.arg("--test").arg("--test-concurrency=1").current_dir(clients_dir());
    let files: Vec<_> = std::fs::read_dir(clients_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".test.mjs"))
        .collect();
    assert!(files.len() >= 3, "client test files present: {files:?}");
    cmd.args(&files);
    with_server_env(&mut cmd, &server);
    run(cmd, "node --test").await;
    server.stop().await;
}

#[tokio::test]
async fn python_pusher_sdk() {
    let server = TestServer::start().await;
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("test_python_sdk.py"));
    with_server_env(&mut cmd, &server);
    run(cmd, "python pusher SDK").await;
    server.stop().await;
}

/// A server on TLS with a certificate from a fresh CA, for the clients' TLS runs.
async fn tls_server(ca: &crate::support::tls::TestCa) -> TestServer {
    let cert = ca.issue("server");
    TestServer::start_with(|c| {
        c.ssl.enabled = true;
        c.ssl.cert_path = cert.cert.display().to_string();
        c.ssl.key_path = cert.key.display().to_string();
    })
    .await
}

#[tokio::test]
async fn node_clients_over_tls_with_a_private_ca() {
    let ca = crate::support::tls::TestCa::new("node-clients");
    let server = tls_server(&ca).await;
    let mut cmd = Command::new("node");
    cmd.args(["--test", "tls-clients.mjs"]).current_dir(clients_dir());
    with_server_env(&mut cmd, &server);
    cmd.env("SOCKUDO_HOST", "localhost").env("NODE_EXTRA_CA_CERTS", ca.ca_path());
    run(cmd, "node --test tls-clients.mjs").await;
    server.stop().await;
}

#[tokio::test]
async fn python_pusher_sdk_over_tls_with_a_private_ca() {
    let ca = crate::support::tls::TestCa::new("python-clients");
    let server = tls_server(&ca).await;
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("test_python_tls.py"));
    with_server_env(&mut cmd, &server);
    cmd.env("SOCKUDO_HOST", "localhost").env("SOCKUDO_CA", ca.ca_path());
    run(cmd, "python pusher SDK over TLS").await;
    server.stop().await;
}
