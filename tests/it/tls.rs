//! TLS on the listeners and to webhook receivers, with a CA the test makes: `wss://` and
//! `https://` on one port, the metrics listener over TLS, certificates rotated without a restart
//! (file change and SIGHUP, a bad file keeping the old one), plain-text clients refused cleanly,
//! bad files refused at startup with exit 64, and an HTTPS webhook receiver behind a private CA.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::process::Process;
use crate::support::tls::{Issued, TestCa};
use crate::support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts only `ca`.
fn trusting(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.ca_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn https(ca: &TestCa) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).unwrap();
    reqwest::Client::builder().add_root_certificate(root).timeout(WAIT).build().unwrap()
}

/// The leaf certificate (DER) of a chain file.
fn leaf(issued: &Issued) -> Vec<u8> {
    CertificateDer::pem_file_iter(&issued.cert).unwrap().next().unwrap().unwrap().to_vec()
}

/// The leaf certificate a fresh handshake with `port` is shown.
async fn presented(port: u16, ca: &TestCa) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(trusting(ca));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp)).await.expect("handshake in time").unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A Pusher client over `wss://` trusting `ca`.
async fn wss_client(port: u16, ca: &TestCa) -> Client {
    let url = format!("wss://localhost:{port}/app/{KEY}?protocol=7&client=rust&version=0.1");
    let connector = tokio_tungstenite::Connector::Rustls(trusting(ca));
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)))
            .await
            .expect("wss connect in time")
            .expect("wss connect");
    let first = next_json(&mut ws).await;
    assert_eq!(first["event"], "pusher:connection_established", "{first}");
    let socket_id = data(&first)["socket_id"].as_str().unwrap().to_owned();
    Client { ws, socket_id }
}

/// A signed publish over `https://`.
async fn https_publish(client: &reqwest::Client, port: u16, channel: &str, event: &str) -> u16 {
    let path = format!("/apps/{APP_ID}/events");
    let body = json!({"name": event, "channel": channel, "data": "{}"}).to_string();
    let query = signed_query(KEY, SECRET, "POST", &path, &[], Some(&body), now());
    let resp = client
        .post(format!("https://localhost:{port}{path}?{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("https publish");
    resp.status().as_u16()
}

/// Replaces a file as a careful operator (or Kubernetes) does: write aside, then rename.
fn replace(target: &Path, from: &Path) {
    let aside = target.with_extension("new");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, target).unwrap();
}

/// The served pair lives in its own two files, so a test can rotate them.
fn served(ca: &TestCa, first: &Issued) -> Issued {
    let served = Issued { cert: ca.dir.join("served.pem"), key: ca.dir.join("served.key") };
    std::fs::copy(&first.cert, &served.cert).unwrap();
    std::fs::copy(&first.key, &served.key).unwrap();
    served
}

fn enable(ssl: &mut sockudo::config::SslConfig, files: &Issued) {
    ssl.enabled = true;
    ssl.cert_path = files.cert.display().to_string();
    ssl.key_path = files.key.display().to_string();
}

/// A server on TLS with `cert`, and a one-second header (and handshake) deadline.
async fn tls_server(cert: &Issued) -> TestServer {
    TestServer::start_with(|c| {
        enable(&mut c.ssl, cert);
        c.http_api.header_read_timeout_seconds = 1;
    })
    .await
}

#[tokio::test]
async fn wss_and_https_share_the_tls_port() {
    let ca = TestCa::new("listener");
    let server = tls_server(&ca.issue("server")).await;
    let mut client = wss_client(server.port, &ca).await;
    client.subscribe("tls-channel").await;
    let http = https(&ca);
    // Keep-alive as on plain HTTP: several requests over one client's pooled connection.
    for i in 0..3 {
        assert_eq!(https_publish(&http, server.port, "tls-channel", &format!("ev-{i}")).await, 200);
        assert_eq!(client.expect(&format!("ev-{i}")).await["channel"], "tls-channel");
    }
    let up = http.get(format!("https://localhost:{}/up", server.port)).send().await.unwrap();
    assert_eq!(up.status(), 200);
    // Metrics stay plain unless metrics.ssl says otherwise.
    assert!(server.scrape().await.contains("sockudo_connected"));
    server.stop().await;
}

#[tokio::test]
async fn plain_text_clients_of_the_tls_port_fail_cleanly() {
    let ca = TestCa::new("plain");
    let server = tls_server(&ca.issue("server")).await;
    // A ws:// client is told, in plain HTTP, that the port speaks TLS.
    let url = server.ws_url(KEY, "protocol=7");
    let err = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("refused in time, not a hang")
        .expect_err("plain WebSocket on a TLS port");
    match err {
        tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("expected an HTTP 400, got {other}"),
    }
    // So is plain curl-style HTTP.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    tcp.write_all(b"GET /up HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer)).await.expect("closed in time").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("https://"), "{answer}");
    // A client that says nothing is closed after the header timeout (1 s), not held.
    let mut silent = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(4), silent.read(&mut buf)).await.expect("closed in time");
    assert_eq!(n.unwrap_or(0), 0, "a silent client is closed without an answer");
    // The TLS clients are unaffected.
    wss_client(server.port, &ca).await;
    server.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_can_serve_tls() {
    let ca = TestCa::new("metrics");
    let cert = ca.issue("metrics");
    let server = TestServer::start_with(|c| enable(&mut c.metrics.ssl, &cert)).await;
    let url = format!("https://localhost:{}/metrics", server.metrics_port);
    let text = https(&ca).get(url).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("sockudo_connected"), "{text}");
    let plain = reqwest::get(format!("http://127.0.0.1:{}/metrics", server.metrics_port)).await.unwrap();
    assert_eq!(plain.status(), 400, "plain HTTP to the TLS metrics port");
    // The WebSocket listener stays plain.
    server.client().await;
    server.stop().await;
}

#[tokio::test]
async fn certificates_rotate_on_file_change_for_new_handshakes_only() {
    let ca = TestCa::new("rotate");
    let (one, two, three) = (ca.issue("one"), ca.issue("two"), ca.issue("three"));
    let files = served(&ca, &one);
    let server = TestServer::start_with(|c| {
        enable(&mut c.ssl, &files);
        c.ssl.watch_interval_ms = 50;
    })
    .await;
    let mut open = wss_client(server.port, &ca).await;
    open.subscribe("rotation").await;
    assert_eq!(presented(server.port, &ca).await, leaf(&one));

    replace(&files.key, &two.key);
    replace(&files.cert, &two.cert);
    let rotated = eventually(WAIT, || async { presented(server.port, &ca).await == leaf(&two) }).await;
    assert!(rotated, "new handshakes present the new certificate");
    // The connection opened before the rotation is untouched.
    let http = https(&ca);
    assert_eq!(https_publish(&http, server.port, "rotation", "after-rotation").await, 200);
    open.expect("after-rotation").await;

    // Half a rotation (the certificate of `three` with the key of `two`) and then a corrupt file
    // are refused: new handshakes keep `two`, and the watcher lives on to load the good pair.
    replace(&files.cert, &three.cert);
    std::fs::write(ca.dir.join("garbage.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await; // at least one watch interval
        assert_eq!(presented(server.port, &ca).await, leaf(&two), "a mismatched pair is not loaded");
    }
    replace(&files.cert, &ca.dir.join("garbage.pem"));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(presented(server.port, &ca).await, leaf(&two), "a corrupt file is not loaded");
    }
    replace(&files.key, &three.key);
    replace(&files.cert, &three.cert);
    let rotated = eventually(WAIT, || async { presented(server.port, &ca).await == leaf(&three) }).await;
    assert!(rotated, "the good pair after bad ones is loaded");
    assert_eq!(https_publish(&http, server.port, "rotation", "still-open").await, 200);
    open.expect("still-open").await;
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_the_binary() {
    let ca = TestCa::new("sighup");
    let (one, two) = (ca.issue("one"), ca.issue("two"));
    let files = served(&ca, &one);
    let node = Process::start(&[
        ("SSL_ENABLED", "true".into()),
        ("SSL_CERT_PATH", files.cert.display().to_string()),
        ("SSL_KEY_PATH", files.key.display().to_string()),
        // Only the signal reloads: the change below must not be picked up on its own.
        ("SSL_WATCH_INTERVAL_MS", "0".into()),
    ])
    .await;
    // A SIGHUP as soon as the port accepts (before the server may have reached its reload
    // task) is held for it, not the default action that would end the process.
    node.signal("HUP").await;
    assert_eq!(presented(node.port, &ca).await, leaf(&one));
    replace(&files.key, &two.key);
    replace(&files.cert, &two.cert);
    assert_eq!(presented(node.port, &ca).await, leaf(&one), "no reload without SIGHUP when watching is off");
    node.signal("HUP").await;
    let rotated = eventually(WAIT, || async { presented(node.port, &ca).await == leaf(&two) }).await;
    assert!(rotated, "SIGHUP reloads");
    // The log line is read from the child's stdout by another task: wait for it.
    let logged = eventually(WAIT, || async { node.logged("TLS certificate reloaded") }).await;
    assert!(logged, "{:?}", node.lines.lock().unwrap());

    std::fs::write(&files.cert, "not a certificate").unwrap();
    node.signal("HUP").await;
    let warned = eventually(WAIT, || async { node.logged("TLS certificate not reloaded") }).await;
    assert!(warned, "a bad file is logged: {:?}", node.lines.lock().unwrap());
    assert_eq!(presented(node.port, &ca).await, leaf(&two), "and the old certificate kept");
    wss_client(node.port, &ca).await;
    let lines = node.stop().await;
    assert!(!lines.iter().any(|l| l.contains("BEGIN")), "no key material in the logs");
}

/// Runs the binary with `env` and returns its exit code and stderr.
fn exit_of(env: &[(&str, String)]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sockudo"));
    cmd.env_clear().env("PORT", "0").env("METRICS_PORT", "0").env("HOST", "127.0.0.1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn unreadable_or_mismatched_tls_files_exit_64_naming_the_key() {
    let ca = TestCa::new("exit");
    let (a, b) = (ca.issue("a"), ca.issue("b"));
    let path = |p: &Path| p.display().to_string();
    let on = ("SSL_ENABLED", "true".to_owned());
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![on.clone()], "ssl.cert_path"),
        (
            vec![on.clone(), ("SSL_CERT_PATH", "/nonexistent.pem".into()), ("SSL_KEY_PATH", path(&a.key))],
            "ssl.cert_path",
        ),
        (
            vec![on.clone(), ("SSL_CERT_PATH", path(&a.cert)), ("SSL_KEY_PATH", "/nonexistent.key".into())],
            "ssl.key_path",
        ),
        (vec![on.clone(), ("SSL_CERT_PATH", path(&a.cert)), ("SSL_KEY_PATH", path(&b.key))], "ssl.key_path"),
        (vec![on.clone(), ("SSL_CERT_PATH", path(&a.key)), ("SSL_KEY_PATH", path(&a.key))], "ssl.cert_path"),
        (
            vec![
                ("METRICS_SSL_ENABLED", "true".into()),
                ("METRICS_SSL_CERT_PATH", path(&b.cert)),
                ("METRICS_SSL_KEY_PATH", path(&a.key)),
            ],
            "metrics.ssl.key_path",
        ),
        (vec![("WEBHOOKS_CA_PATH", "/nonexistent-ca.pem".into())], "webhooks.ca_path"),
        (vec![("WEBHOOKS_CA_PATH", path(&a.key))], "webhooks.ca_path"),
    ];
    for (env, key) in cases {
        let (code, stderr) = exit_of(&env);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(&format!("invalid configuration: {key}:")), "{env:?} names {key}: {stderr}");
        assert!(!stderr.contains("PRIVATE KEY"), "no key material in the error: {stderr}");
    }
    // The good pair starts (checked with --check-config, which reads the files too).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sockudo"))
        .arg("--check-config")
        .env("SSL_ENABLED", "true")
        .env("SSL_CERT_PATH", path(&a.cert))
        .env("SSL_KEY_PATH", path(&a.key))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["ssl"]["enabled"], true);
}

/// An HTTPS webhook receiver with a certificate from `ca`, recording request bodies.
async fn https_receiver(ca: &TestCa) -> (u16, Arc<Mutex<Vec<String>>>) {
    let cert = ca.issue("receiver");
    let chain: Vec<_> = CertificateDer::pem_file_iter(&cert.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let sink = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, sink) = (acceptor.clone(), sink.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let body = http_body_util::BodyExt::collect(req.into_body()).await?.to_bytes();
                        sink.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (port, bodies)
}

#[tokio::test]
async fn webhooks_reach_an_https_receiver_behind_a_private_ca() {
    let ca = TestCa::new("webhook");
    let (port, bodies) = https_receiver(&ca).await;
    let hook = |c: &mut sockudo::config::Config| {
        c.app_manager.array.apps[0].webhooks = vec![sockudo::config::WebhookConfig {
            url: format!("https://localhost:{port}/hook"),
            event_types: vec!["channel_occupied".into()],
            headers: Default::default(),
        }];
        c.webhooks.batch_ms = 20;
        c.webhooks.max_retry_seconds = 1;
    };
    // Without the CA the receiver's certificate is not trusted: nothing is delivered.
    let untrusting = TestServer::start_with(hook).await;
    untrusting.client().await.subscribe("untrusted-hook").await;
    let retried = eventually(WAIT, || async {
        let failed = untrusting.metric("sockudo_webhooks_total", &[("app_id", APP_ID), ("outcome", "retried")]).await;
        failed.unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(retried, "an untrusted receiver is a failed attempt");
    assert!(bodies.lock().unwrap().is_empty(), "nothing reached the untrusted receiver");
    untrusting.stop().await;

    let ca_path = ca.ca_path().display().to_string();
    let trusting = TestServer::start_with(|c| {
        hook(c);
        c.webhooks.ca_path = ca_path;
    })
    .await;
    trusting.client().await.subscribe("trusted-hook").await;
    let delivered = eventually(WAIT, || {
        let got = bodies.lock().unwrap().iter().any(|b| b.contains("trusted-hook") && b.contains("channel_occupied"));
        async move { got }
    })
    .await;
    assert!(delivered, "channel_occupied over HTTPS: {:?}", bodies.lock().unwrap());
    trusting.stop().await;
}
