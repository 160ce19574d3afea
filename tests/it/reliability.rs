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
    let body = json!({"name": "e", "channel": "private-secret-scan", "data": "payload-marker"}).to_string();
    let (status, query) = signed_publish(server.port, &body, None).await;
    assert_eq!(status, 200);
    let api_sig = query.rsplit_once("auth_signature=").unwrap().1.to_owned();
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

/// 10,000 concurrent subscribe/unsubscribe/disconnect operations on one hot presence channel
/// leave no stale state, and an observer sees each user's joins and leaves strictly alternate.
#[tokio::test]
async fn race_suite_leaves_no_stale_presence_state() {
    let server = TestServer::start_with(|c| {
        c.app_manager.array.apps[0].max_presence_members_per_channel = 1000;
    })
    .await;
    let channel = "presence-hot";
    let mut observer = server.client().await;
    observer.subscribe_presence(channel, "observer").await;
    let workers = 40;
    let rounds = 250; // 40 x 250 = 10,000 operations
    let mut tasks = Vec::new();
    for w in 0..workers {
        let url = server.ws_url(KEY, "protocol=7");
        tasks.push(tokio::spawn(async move {
            // Two workers share each user id, so the same user joins from two sockets at once.
            let user = format!("user-{}", w / 2);
            let mut c = Client::connect(&url).await;
            for r in 0..rounds {
                match r % 5 {
                    // Disconnect abruptly and come back.
                    4 => {
                        drop(c);
                        c = Client::connect(&url).await;
                    }
                    // Subscribe then unsubscribe.
                    0 | 2 => {
                        c.subscribe_presence("presence-hot", &user).await;
                    }
                    _ => {
                        c.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "presence-hot"}})).await;
                    }
                }
            }
            c.close().await;
        }));
    }
    // Meanwhile the observer records member events in order.
    let mut last: std::collections::HashMap<String, &'static str> = std::collections::HashMap::new();
    let mut events = 0usize;
    let all_done = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::pin!(all_done);
    let mut finished = false;
    loop {
        tokio::select! {
            _ = &mut all_done, if !finished => finished = true,
            f = tokio::time::timeout(Duration::from_millis(500), observer.next()) => match f {
                Ok(f) => {
                    let kind = match f["event"].as_str() {
                        Some("pusher_internal:member_added") => "added",
                        Some("pusher_internal:member_removed") => "removed",
                        _ => continue,
                    };
                    let user = data(&f)["user_id"].as_str().unwrap().to_owned();
                    let prev = last.insert(user.clone(), kind);
                    assert_ne!(prev, Some(kind), "{user}: two {kind} in a row");
                    events += 1;
                }
                Err(_) if finished => break,
                Err(_) => {}
            },
        }
    }
    assert!(events > 20, "the observer saw member events: {events}");
    // Every user that joined has left; nobody but the observer is present.
    for (user, state) in &last {
        assert_eq!(*state, "removed", "{user} still present for the observer");
    }
    let (_, users) = server.api("GET", "/channels/presence-hot/users", &[], None).await;
    assert_eq!(users, json!({"users": [{"id": "observer"}]}));
    let (_, info) =
        server.api("GET", "/channels/presence-hot", &[("info", "subscription_count,user_count")], None).await;
    assert_eq!(info, json!({"occupied": true, "subscription_count": 1, "user_count": 1}));
    assert!(
        eventually(WAIT, || async { server.metric("sockudo_connected", &[("app_id", APP_ID)]).await == Some(1.0) })
            .await
    );
    observer.close().await;
    let idle = [("app_id", APP_ID), ("channel_type", "presence")];
    assert!(eventually(WAIT, || async { server.metric("sockudo_active_channels", &idle).await == Some(0.0) }).await);
    let subs = server.metric("sockudo_channel_subscriptions_total", &idle).await.unwrap();
    let unsubs = server.metric("sockudo_channel_unsubscriptions_total", &idle).await.unwrap();
    assert_eq!(subs, unsubs, "every subscription ended exactly once");
    server.stop().await;
}

/// Admission control by memory: above `max_memory_mb` new sockets are refused with 4100 (a
/// retryable code, counted as `over_capacity`) while existing ones keep working.
#[tokio::test]
async fn memory_admission_control_refuses_new_connections() {
    let server = TestServer::start_with(|c| c.max_memory_mb = 1).await;
    // Any real process is above 1 MiB once the sampler has run.
    let refused = eventually(WAIT, || async {
        let mut ws = Client::open(&server.ws_url(KEY, "protocol=7")).await;
        let f = next_json(&mut ws).await;
        f["event"] == "pusher:error" && f["data"]["code"] == 4100
    })
    .await;
    assert!(refused, "connections above the memory limit are refused with 4100");
    let l = [("app_id", APP_ID), ("error_type", "over_capacity")];
    assert!(server.metric("sockudo_connection_errors_total", &l).await.unwrap() >= 1.0);
    server.stop().await;
    // A generous limit admits everyone.
    let roomy = TestServer::start_with(|c| c.max_memory_mb = 1 << 20).await;
    let mut c = roomy.client().await;
    c.subscribe("fine").await;
    roomy.stop().await;
}
