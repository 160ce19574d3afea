//! Cluster semantics, written once for every broker: the envelope, cross-node queries with a
//! deadline, node liveness from heartbeats, and the replicated presence view that makes
//! `member_added`/`member_removed` happen once per user cluster-wide. The broker links in
//! `transport.rs` only move these envelopes.
//!
//! An envelope is a small JSON header, a newline, and a body (for broadcasts, the frame exactly
//! as sockets receive it, so a receiving node never serialises it again).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

/// What travels between nodes. Every variant names its sender (`n`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum Header {
    /// A frame for the local subscribers of `c`; the body is the frame.
    #[serde(rename = "broadcast")]
    Broadcast {
        n: String,
        a: String,
        c: String,
        /// Socket excluded (`socket_id` of the publish).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<String>,
        /// Unix time in microseconds when the origin accepted the publish (0: not a publish).
        o: u64,
        /// W3C `traceparent` of the origin's `broadcast` span.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tp: Option<String>,
        /// The frame is also the channel's cached last event.
        #[serde(default)]
        cache: bool,
        /// Event name, for the `broadcast.remote` span.
        #[serde(default)]
        e: String,
    },
    #[serde(rename = "query")]
    Query { n: String, id: u64, a: String, q: Query },
    #[serde(rename = "answer")]
    Answer { n: String, to: String, id: u64, a: String, body: Value },
    #[serde(rename = "heartbeat")]
    Heartbeat { n: String },
    /// The sender is leaving (graceful shutdown): drop it now rather than after the timeout.
    #[serde(rename = "leave")]
    Leave { n: String },
    /// `i` is the member's `user_info` as JSON text (a string: internally tagged enums cannot
    /// carry raw JSON values).
    #[serde(rename = "join")]
    PresenceJoin { n: String, a: String, c: String, u: String, i: String },
    #[serde(rename = "part")]
    PresenceLeave { n: String, a: String, c: String, u: String },
    /// The sender's complete local presence, replacing what we knew of it.
    #[serde(rename = "snapshot")]
    Snapshot { n: String, members: Vec<SnapshotEntry> },
    /// Asks every node for its snapshot (on start and after a broker outage).
    #[serde(rename = "sync")]
    Sync { n: String },
    #[serde(rename = "terminate")]
    Terminate { n: String, a: String, u: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub a: String,
    pub c: String,
    pub u: String,
    /// `user_info` as JSON text.
    pub i: String,
}

/// A cross-node question about one app's channels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Query {
    /// Local subscription counts of channels starting with `prefix`: `{"name": count}`.
    #[serde(rename = "channels")]
    Channels { prefix: String },
    /// Local subscription count of one channel: a number.
    #[serde(rename = "channel")]
    Channel { name: String },
}

impl Header {
    pub fn sender(&self) -> &str {
        match self {
            Header::Broadcast { n, .. }
            | Header::Query { n, .. }
            | Header::Answer { n, .. }
            | Header::Heartbeat { n }
            | Header::Leave { n }
            | Header::PresenceJoin { n, .. }
            | Header::PresenceLeave { n, .. }
            | Header::Snapshot { n, .. }
            | Header::Sync { n }
            | Header::Terminate { n, .. } => n,
        }
    }
}

/// Header JSON, `\n`, body.
pub fn encode(header: &Header, body: &[u8]) -> Bytes {
    let mut out = serde_json::to_vec(header).unwrap_or_default();
    out.reserve(body.len() + 1);
    out.push(b'\n');
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The header and body of an envelope; `None` for anything malformed (ignored, never fatal).
pub fn decode(payload: &Bytes) -> Option<(Header, Bytes)> {
    let split = payload.iter().position(|b| *b == b'\n')?;
    let header = serde_json::from_slice(&payload[..split]).ok()?;
    Some((header, payload.slice(split + 1..)))
}

struct Member {
    info: String,
    nodes: HashSet<Arc<str>>,
}

type PresenceKey = (String, String);

/// A presence change this node must announce to its local subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Added { app: String, channel: String, user: String, info: String },
    Removed { app: String, channel: String, user: String },
}

/// The replicated cluster state of one node.
pub struct Cluster {
    pub node: Arc<str>,
    out: mpsc::Sender<Bytes>,
    nodes: Mutex<HashMap<Arc<str>, Instant>>,
    pending: Mutex<HashMap<u64, mpsc::Sender<Value>>>,
    presence: Mutex<HashMap<PresenceKey, HashMap<String, Member>>>,
    next_id: AtomicU64,
    pub request_timeout: Duration,
    pub node_timeout: Duration,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only update maps; a panic inside one leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub fn new(node: &str, out: mpsc::Sender<Bytes>, request_timeout: Duration, node_timeout: Duration) -> Self {
        Self {
            node: Arc::from(node),
            out,
            nodes: Mutex::default(),
            pending: Mutex::default(),
            presence: Mutex::default(),
            next_id: AtomicU64::new(1),
            request_timeout,
            node_timeout,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues an envelope for the broker; a full queue drops it (counted, logged sparsely).
    pub fn send(&self, header: &Header, body: &[u8]) {
        if self.out.try_send(encode(header, body)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "cluster outbox full; envelopes dropped");
            }
        }
    }

    pub fn me(&self) -> String {
        self.node.to_string()
    }

    // ---- liveness ------------------------------------------------------------------------

    /// Notes that `node` is alive; true when it was not known.
    pub fn seen(&self, node: &str) -> bool {
        let mut nodes = lock(&self.nodes);
        match nodes.get_mut(node) {
            Some(t) => {
                *t = Instant::now();
                false
            }
            None => {
                nodes.insert(Arc::from(node), Instant::now());
                true
            }
        }
    }

    /// Forgets `node` (it left); true when it was known.
    pub fn forget(&self, node: &str) -> bool {
        lock(&self.nodes).remove(node).is_some()
    }

    /// Nodes silent for longer than the node timeout, forgotten now.
    pub fn expire(&self) -> Vec<Arc<str>> {
        let mut nodes = lock(&self.nodes);
        let dead: Vec<Arc<str>> =
            nodes.iter().filter(|(_, t)| t.elapsed() > self.node_timeout).map(|(n, _)| n.clone()).collect();
        for n in &dead {
            nodes.remove(n);
        }
        dead
    }

    /// Other nodes currently alive.
    pub fn peers(&self) -> usize {
        lock(&self.nodes).len()
    }

    // ---- queries -------------------------------------------------------------------------

    /// Asks every other node; returns their answers and whether all answered in time.
    pub async fn query(&self, app: &str, q: Query) -> (Vec<Value>, bool, Duration) {
        let expected = self.peers();
        let started = Instant::now();
        if expected == 0 {
            return (Vec::new(), true, Duration::ZERO);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(expected.max(1));
        lock(&self.pending).insert(id, tx);
        self.send(&Header::Query { n: self.me(), id, a: app.to_owned(), q }, b"");
        let mut answers = Vec::with_capacity(expected);
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        while answers.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(v)) => answers.push(v),
                _ => break,
            }
        }
        lock(&self.pending).remove(&id);
        let complete = answers.len() >= expected;
        (answers, complete, started.elapsed())
    }

    /// Routes an answer to its waiting query; false when nobody waits (late or not ours).
    pub fn answered(&self, id: u64, body: Value) -> bool {
        match lock(&self.pending).get(&id) {
            Some(tx) => tx.try_send(body).is_ok(),
            None => false,
        }
    }

    // ---- presence ------------------------------------------------------------------------

    /// `user` joined `channel` on `node`; true when the user was not present anywhere before.
    pub fn join(&self, node: &str, app: &str, channel: &str, user: &str, info: &str) -> bool {
        let mut p = lock(&self.presence);
        let members = p.entry((app.to_owned(), channel.to_owned())).or_default();
        let member =
            members.entry(user.to_owned()).or_insert_with(|| Member { info: info.to_owned(), nodes: HashSet::new() });
        let was_empty = member.nodes.is_empty();
        member.nodes.insert(Arc::from(node));
        was_empty
    }

    /// `user` left `channel` on `node`; true when it is now present nowhere.
    pub fn part(&self, node: &str, app: &str, channel: &str, user: &str) -> bool {
        let mut p = lock(&self.presence);
        let key = (app.to_owned(), channel.to_owned());
        let Some(members) = p.get_mut(&key) else { return false };
        let Some(member) = members.get_mut(user) else { return false };
        if !member.nodes.remove(node) || !member.nodes.is_empty() {
            return false;
        }
        members.remove(user);
        if members.is_empty() {
            p.remove(&key);
        }
        true
    }

    /// Removes everything `node` contributed; the users now present nowhere.
    pub fn drop_node(&self, node: &str) -> Vec<PresenceEvent> {
        self.replace_node(node, &[])
    }

    /// Replaces `node`'s contribution with `entries`; the resulting cluster-wide changes.
    pub fn replace_node(&self, node: &str, entries: &[SnapshotEntry]) -> Vec<PresenceEvent> {
        let mut events = Vec::new();
        let keep: HashSet<(&str, &str, &str)> =
            entries.iter().map(|e| (e.a.as_str(), e.c.as_str(), e.u.as_str())).collect();
        let mut gone = Vec::new();
        {
            let p = lock(&self.presence);
            for ((a, c), members) in p.iter() {
                for (u, m) in members {
                    if m.nodes.contains(node) && !keep.contains(&(a.as_str(), c.as_str(), u.as_str())) {
                        gone.push((a.clone(), c.clone(), u.clone()));
                    }
                }
            }
        }
        for (a, c, u) in gone {
            if self.part(node, &a, &c, &u) {
                events.push(PresenceEvent::Removed { app: a, channel: c, user: u });
            }
        }
        for e in entries {
            if self.join(node, &e.a, &e.c, &e.u, &e.i) {
                events.push(PresenceEvent::Added {
                    app: e.a.clone(),
                    channel: e.c.clone(),
                    user: e.u.clone(),
                    info: e.i.clone(),
                });
            }
        }
        events
    }

    /// This node's own contribution, to announce.
    pub fn snapshot(&self) -> Vec<SnapshotEntry> {
        let p = lock(&self.presence);
        let mut out = Vec::new();
        for ((a, c), members) in p.iter() {
            for (u, m) in members {
                if m.nodes.contains(&*self.node) {
                    out.push(SnapshotEntry { a: a.clone(), c: c.clone(), u: u.clone(), i: m.info.clone() });
                }
            }
        }
        out
    }

    /// The cluster-wide members of a presence channel: `(user_id, user_info JSON)`.
    pub fn members(&self, app: &str, channel: &str) -> Vec<(String, String)> {
        let p = lock(&self.presence);
        p.get(&(app.to_owned(), channel.to_owned()))
            .map(|m| m.iter().map(|(u, m)| (u.clone(), m.info.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `user` may join `channel` under a cluster-wide limit of `max` members: it is a
    /// member already (on some node), or there are fewer than `max` members on all nodes.
    pub fn has_room(&self, app: &str, channel: &str, user: &str, max: usize) -> bool {
        let p = lock(&self.presence);
        p.get(&(app.to_owned(), channel.to_owned()))
            .is_none_or(|m| m.get(user).is_some_and(|member| !member.nodes.is_empty()) || m.len() < max)
    }

    pub fn user_count(&self, app: &str, channel: &str) -> usize {
        lock(&self.presence).get(&(app.to_owned(), channel.to_owned())).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let (tx, _rx) = mpsc::channel(16);
        Cluster::new("me", tx, Duration::from_millis(100), Duration::from_secs(5))
    }

    #[test]
    fn envelopes_round_trip() {
        let h = Header::Broadcast {
            n: "a".into(),
            a: "app".into(),
            c: "ch".into(),
            x: None,
            o: 5,
            tp: None,
            cache: false,
            e: "ev".into(),
        };
        let bytes = encode(&h, b"{\"event\":\"ev\"}\n{}");
        let (back, body) = decode(&bytes).unwrap();
        assert_eq!(back.sender(), "a");
        assert_eq!(&body[..], b"{\"event\":\"ev\"}\n{}");
        assert!(decode(&Bytes::from_static(b"garbage")).is_none());
    }

    #[test]
    fn presence_is_once_per_user_across_nodes() {
        let c = cluster();
        assert!(c.join("me", "a", "presence-x", "u", "{}"));
        assert!(!c.join("other", "a", "presence-x", "u", "{}"));
        assert!(!c.part("me", "a", "presence-x", "u"));
        assert_eq!(c.user_count("a", "presence-x"), 1);
        let events = c.drop_node("other");
        assert_eq!(
            events,
            vec![PresenceEvent::Removed { app: "a".into(), channel: "presence-x".into(), user: "u".into() }]
        );
        assert_eq!(c.user_count("a", "presence-x"), 0);
    }

    #[test]
    fn snapshots_replace_a_nodes_contribution() {
        let c = cluster();
        c.join("other", "a", "presence-x", "u1", "{}");
        let entry = SnapshotEntry { a: "a".into(), c: "presence-x".into(), u: "u2".into(), i: "{}".into() };
        let events = c.replace_node("other", &[entry]);
        assert_eq!(events.len(), 2);
        assert_eq!(c.members("a", "presence-x").len(), 1);
        assert!(c.snapshot().is_empty());
    }
}
