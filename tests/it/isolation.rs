//! Tenant isolation and hostile input, round two: each confirmed defect of the outside review has
//! a test here that fails on the code before its fix (an identity swapped by a second subscribe,
//! a leaked slot after a panic, a path that is not a Pusher path, ...).

use serde_json::json;

use crate::support::*;

/// A second, validly signed subscribe to a presence channel the socket already has changes
/// nothing: its client events keep the first `user_id`, the member list keeps the first member,
/// and the answer is `subscription_succeeded` again with the first identity (as Pusher does).
#[tokio::test]
async fn a_second_subscribe_does_not_change_who_a_socket_is() {
    let server = TestServer::start().await;
    let mut alice = server.client().await;
    let mut watcher = server.client().await;
    watcher.subscribe_presence("presence-room", "watcher").await;
    alice.subscribe_presence("presence-room", "alice").await;
    watcher.expect_for("pusher_internal:member_added", "presence-room").await;
    // The same socket subscribes again as "mallory", correctly signed.
    let again = alice.subscribe_presence("presence-room", "mallory").await;
    let presence = data(&again)["presence"].clone();
    let mut ids: Vec<String> = serde_json::from_value(presence["ids"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, ["alice", "watcher"], "{again}");
    alice
        .send(json!({"event": "client-hello", "channel": "presence-room", "data": {"n": 1}}))
        .await;
    let got = watcher.expect_for("client-hello", "presence-room").await;
    assert_eq!(got["user_id"], "alice", "the client event carries the socket's first identity: {got}");
    let (_, users) = server.api("GET", "/channels/presence-room/users", &[], None).await;
    let mut listed: Vec<String> =
        users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    listed.sort();
    assert_eq!(listed, ["alice", "watcher"]);
    // The same on a private channel: still one subscription, delivered once.
    alice.subscribe_private("private-x").await;
    alice.subscribe_private("private-x").await;
    server.publish("private-x", "once", "1").await;
    server.publish("private-x", "marker", "2").await;
    assert_eq!(alice.expect_for("once", "private-x").await["event"], "once");
    assert_eq!(alice.next().await["event"], "marker");
    server.stop().await;
}
