//! Reliability under hostile conditions: slowloris sockets that never finish their request
//! head, and a scan of everything the server logs (at trace level) for secrets and signatures.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::support::process::Process;
use crate::support::*;

/// Thousands of half-open and dribbling sockets do not keep normal clients out, and are dropped
/// after the header deadline.
#[tokio::test]
async fn slowloris_sockets_do_not_starve_real_clients() {
    let server = TestServer::start_with(|c| c.http_api.header_read_timeout_seconds = 2).await;
    let mut idle = Vec::new();
    for i in 0..2000 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        if i % 2 == 0 {
            // Dribbling: a request head that never ends.
            s.write_all(b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        }
        idle.push(s);
    }
    // Real clients still connect, subscribe and receive; the API still answers.
    let mut c = server.client().await;
    c.subscribe("alive").await;
    assert_eq!(server.publish("alive", "e", "1").await.0, 200);
    assert_eq!(c.expect("e").await["data"], "1");
    // Every slow socket is closed by the server after the deadline.
    let closed = eventually(Duration::from_secs(15), || {
        let idle = &idle;
        async move {
            let mut open = 0;
            for s in idle.iter() {
                let mut buf = [0u8; 1];
                match s.try_read(&mut buf) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                    _ => {}
                }
            }
            open == 0
        }
    })
    .await;
    assert!(closed, "slowloris sockets were not all dropped");
    c.subscribe("still-alive").await;
    server.stop().await;
}

/// Everything the binary prints at trace level while clients authenticate, sign in, publish
/// signed requests and fail authentication contains no secret, signature or auth string.
#[tokio::test]
async fn no_secret_or_signature_in_any_log_line() {
    let server = Process::start(&[("LOG_LEVEL", "trace".into()), ("LOG_FORMAT", "json".into())]).await;
    let mut c = server.client().await;
    let auth = c.auth(SECRET, "private-secret-scan", None);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-secret-scan", "auth": auth}})).await;
    c.expect("pusher_internal:subscription_succeeded").await;
    let bad = c.auth("not-the-secret", "private-other", None);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-other", "auth": bad}})).await;
    c.expect("pusher:subscription_error").await;
    let user_data = json!({"id": "u-scan"}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{}::user::{user_data}", c.socket_id));
    c.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}})).await;
    c.expect("pusher:signin_success").await;
    let path = format!("/apps/{APP_ID}/events");
    let body = json!({"name": "e", "channel": "private-secret-scan", "data": "payload-marker"}).to_string();
    let query = signed_query(KEY, SECRET, "POST", &path, &[], Some(&body), now());
    let api_sig = query.rsplit_once("auth_signature=").unwrap().1.to_owned();
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{path}?{query}", server.port))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    c.expect("e").await;
    // A request with a wrong signature is logged as a failure, without the signature.
    let bad_query = signed_query(KEY, "wrong", "GET", &format!("/apps/{APP_ID}/channels"), &[], None, now());
    let bad_sig = bad_query.rsplit_once("auth_signature=").unwrap().1.to_owned();
    let status = reqwest::get(format!("http://127.0.0.1:{}/apps/{APP_ID}/channels?{bad_query}", server.port))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    c.close().await;
    let lines = server.stop().await;
    assert!(lines.iter().any(|l| l.contains("connection opened")), "debug-level output was captured: {lines:?}");
    let forbidden = [
        SECRET.to_owned(),
        auth.split_once(':').unwrap().1.to_owned(),
        bad.split_once(':').unwrap().1.to_owned(),
        sig,
        api_sig,
        bad_sig,
        "payload-marker".to_owned(),
    ];
    for line in &lines {
        for f in &forbidden {
            assert!(!line.contains(f.as_str()), "log line leaks {f:?}: {line}");
        }
    }
    assert!(lines.iter().any(|l| l.contains("authentication failed")), "failures are logged");
}
