//! Cluster semantics, written once for every broker: the envelope, cross-node queries with a
//! deadline, node liveness from heartbeats, and the replicated presence view that makes
//! `member_added`/`member_removed` happen once per user cluster-wide. The broker links in
//! `transport.rs` only move these envelopes.
//!
//! An envelope is a small JSON header, a newline, and a body (for broadcasts, the frame exactly
//! as sockets receive it, so a receiving node never serialises it again). With
//! `adapter.cluster_secret` every envelope is sealed ([`Signer`]): a line carrying an
//! HMAC-SHA256 over the sender's id, a timestamp and the envelope's bytes, computed once per
//! envelope on send and verified over the received bytes before the header is parsed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;

use super::lanes::{Full, Lanes};
use crate::app::App;
use crate::telemetry::logs::Sparse;

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
        /// W3C `baggage` of that span's context, when it has any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bg: Option<String>,
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
    let mut out = Vec::with_capacity(128 + body.len());
    encode_into(&mut out, header, body);
    Bytes::from(out)
}

fn encode_into(out: &mut Vec<u8>, header: &Header, body: &[u8]) {
    // Writing a derived `Serialize` of strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, header);
    out.reserve(body.len() + 1);
    out.push(b'\n');
    out.extend_from_slice(body);
}

/// The header and body of an envelope; `None` for anything malformed (ignored, never fatal).
pub fn decode(payload: &Bytes) -> Option<(Header, Bytes)> {
    let split = payload.iter().position(|b| *b == b'\n')?;
    let header = serde_json::from_slice(&payload[..split]).ok()?;
    Some((header, payload.slice(split + 1..)))
}

// ---- signed envelopes ------------------------------------------------------------------

/// How far a sealed envelope's timestamp may be from the receiver's clock, either way. A
/// captured envelope can be replayed only within this window; nodes' clocks must agree to well
/// within it (NTP).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);

/// The first bytes of a sealed envelope. An unsigned one starts with its JSON header (`{`).
const SEALED: &[u8] = b"s1 ";
/// The MAC in hex, after [`SEALED`].
const MAC_HEX: usize = 64;
/// Where the signed part starts: after `s1 `, the MAC and a space.
const SIGNED_AT: usize = SEALED.len() + MAC_HEX + 1;

type HmacSha256 = Hmac<Sha256>;

/// Seals and opens envelopes with the cluster secret.
///
/// A sealed envelope is `s1 <mac: 64 hex> <unix ms> <node id>\n<header JSON>\n<body>`, and the
/// MAC is HMAC-SHA256 over the cluster's scope (`sockudo-cluster/{prefix}\n`, so two clusters
/// sharing a broker and a secret cannot replay into each other), then `s1 ` and every byte after
/// the MAC's trailing space: the timestamp, the sender's id and the envelope exactly as sent. The receiver verifies it over the bytes it
/// received (in constant time), before it parses anything, then checks the timestamp against
/// [`REPLAY_WINDOW`] and that the header names the same sender as the signed line.
#[derive(Clone)]
pub struct Signer {
    /// Keyed once: each seal or open clones this state instead of hashing the key again.
    keyed: HmacSha256,
}

/// Why an envelope from the broker was not processed. Each maps to one `reason` of
/// `horizontal_adapter_dropped_total` ([`Rejected::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not an envelope: no header line, or a header that is not ours (from a trusted sender).
    #[error("malformed envelope")]
    Malformed,
    /// This node requires signatures and the envelope carries none.
    #[error("unsigned envelope")]
    Unsigned,
    /// Signed, but this node has no `adapter.cluster_secret` to verify it with.
    #[error("signed envelope, but this node has no cluster secret")]
    NoSecret,
    /// The MAC does not verify (another secret, or forged or altered bytes).
    #[error("signature does not verify")]
    BadSignature,
    /// The MAC verifies but the timestamp is outside the replay window.
    #[error("timestamp outside the replay window")]
    Stale,
    /// The MAC verifies but the header claims another sender than the signed one.
    #[error("header sender differs from the signed sender")]
    SenderMismatch,
}

/// `reason` of a dropped incoming envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Decode,
    Unauthenticated,
}

impl Rejected {
    /// Anything not shown to come from a holder of the secret is `unauthenticated`; `decode` is
    /// left for envelopes a trusted sender got wrong (a bug or a version skew worth a look).
    pub fn reason(&self) -> RejectReason {
        match self {
            Rejected::Malformed => RejectReason::Decode,
            Rejected::Unsigned
            | Rejected::NoSecret
            | Rejected::BadSignature
            | Rejected::Stale
            | Rejected::SenderMismatch => RejectReason::Unauthenticated,
        }
    }
}

impl Signer {
    /// A signer keyed with `secret` for the cluster on broker prefix `scope` (HMAC takes a key
    /// of any length; `validate` has checked it). The scope is absorbed once, into the keyed
    /// state every seal and open starts from, so it costs nothing per envelope.
    pub fn new(secret: &[u8], scope: &str) -> Result<Self, hmac::digest::InvalidLength> {
        let mut keyed = HmacSha256::new_from_slice(secret)?;
        keyed.update(b"sockudo-cluster/");
        keyed.update(scope.as_bytes());
        keyed.update(b"\n");
        Ok(Self { keyed })
    }

    /// `header` and `body` sealed by `node` at `now_ms` (Unix milliseconds): one buffer, one MAC.
    pub fn seal(&self, node: &str, now_ms: u64, header: &Header, body: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(SIGNED_AT + 24 + node.len() + 128 + body.len());
        out.extend_from_slice(SEALED);
        out.resize(SEALED.len() + MAC_HEX, b'0');
        out.push(b' ');
        out.extend_from_slice(now_ms.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(node.as_bytes());
        out.push(b'\n');
        encode_into(&mut out, header, body);
        let mut mac = self.keyed.clone();
        mac.update(SEALED);
        mac.update(&out[SIGNED_AT..]);
        let tag = mac.finalize().into_bytes();
        // 32 bytes into 64 hex digits: the sizes are fixed, so this cannot fail.
        let _ = hex::encode_to_slice(tag, &mut out[SEALED.len()..SEALED.len() + MAC_HEX]);
        Bytes::from(out)
    }

    /// The signed sender and the envelope inside `payload`, if its MAC verifies and its
    /// timestamp is within the window of `now_ms`.
    pub fn open(&self, payload: &Bytes, now_ms: u64) -> Result<(String, Bytes), Rejected> {
        if !payload.starts_with(SEALED) {
            return Err(Rejected::Unsigned);
        }
        if payload.len() <= SIGNED_AT || payload[SIGNED_AT - 1] != b' ' {
            return Err(Rejected::BadSignature);
        }
        let mut tag = [0u8; 32];
        hex::decode_to_slice(&payload[SEALED.len()..SIGNED_AT - 1], &mut tag).map_err(|_| Rejected::BadSignature)?;
        let mut mac = self.keyed.clone();
        mac.update(SEALED);
        mac.update(&payload[SIGNED_AT..]);
        mac.verify_slice(&tag).map_err(|_| Rejected::BadSignature)?;
        // Authenticated from here on: what fails to parse was sent by a holder of the secret.
        let signed = &payload[SIGNED_AT..];
        let line_end = signed.iter().position(|b| *b == b'\n').ok_or(Rejected::Malformed)?;
        let line = std::str::from_utf8(&signed[..line_end]).map_err(|_| Rejected::Malformed)?;
        let (ts, node) = line.split_once(' ').ok_or(Rejected::Malformed)?;
        let ts: u64 = ts.parse().map_err(|_| Rejected::Malformed)?;
        if ts.abs_diff(now_ms) > REPLAY_WINDOW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        Ok((node.to_owned(), payload.slice(SIGNED_AT + line_end + 1..)))
    }
}

/// The sender a sealed envelope claims, read without verifying anything: only to skip our own
/// envelopes (Redis echoes them) before paying for a MAC. A forgery claiming our id is then
/// dropped uncounted, which is what verifying it would have led to as well.
fn claimed_sender(payload: &[u8]) -> Option<&[u8]> {
    if !payload.starts_with(SEALED) {
        return None;
    }
    let signed = payload.get(SIGNED_AT..)?;
    let line = &signed[..signed.iter().position(|b| *b == b'\n')?];
    let space = line.iter().position(|b| *b == b' ')?;
    Some(&line[space + 1..])
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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
    out: Arc<Lanes>,
    nodes: Mutex<HashMap<Arc<str>, Instant>>,
    pending: Mutex<HashMap<u64, mpsc::Sender<Value>>>,
    presence: Mutex<HashMap<PresenceKey, HashMap<String, Member>>>,
    next_id: AtomicU64,
    pub request_timeout: Duration,
    pub node_timeout: Duration,
    /// Seals every envelope sent and requires a seal on every one received, when set.
    signer: Option<Signer>,
    /// Envelopes not queued for the broker: the outbox was full.
    dropped: AtomicU64,
    /// Envelopes received and not processed, by [`RejectReason`].
    malformed: AtomicU64,
    unauthenticated: AtomicU64,
}

/// The envelopes [`Cluster`] has dropped so far, for `horizontal_adapter_dropped_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterDrops {
    pub out_queue_full: u64,
    pub in_decode: u64,
    pub in_unauthenticated: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only update maps; a panic inside one leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub fn new(
        node: &str,
        out: Arc<Lanes>,
        request_timeout: Duration,
        node_timeout: Duration,
        signer: Option<Signer>,
    ) -> Self {
        Self {
            node: Arc::from(node),
            out,
            nodes: Mutex::default(),
            pending: Mutex::default(),
            presence: Mutex::default(),
            next_id: AtomicU64::new(1),
            request_timeout,
            node_timeout,
            signer,
            dropped: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
        }
    }

    /// Whether envelopes are sealed and seals required.
    pub fn signed(&self) -> bool {
        self.signer.is_some()
    }

    /// Queues a node envelope (heartbeat, snapshot, query, ...) for the broker, sealed once
    /// when signing is on; a full queue drops it (counted, logged sparsely).
    pub fn send(&self, header: &Header, body: &[u8]) {
        self.queue(None, header, body);
    }

    /// Queues an envelope caused by `app`'s traffic in the app's lane of the outgoing queue
    /// ([`Lanes`]): apps take turns on the link, and one app flooding a slow link fills only
    /// its own lane and drops only its own envelopes.
    pub fn send_for(&self, app: &App, header: &Header, body: &[u8]) {
        self.queue(Some(&app.id), header, body);
    }

    fn queue(&self, app: Option<&str>, header: &Header, body: &[u8]) {
        let payload = match &self.signer {
            Some(s) => s.seal(&self.node, unix_millis(), header, body),
            None => encode(header, body),
        };
        match self.out.push(app, payload) {
            Ok(()) => {}
            Err(Full::App) => self.dropped_one("an app's lane of the cluster outbox is full; its envelopes dropped"),
            Err(Full::Queue) => self.dropped_one("cluster outbox full; envelopes dropped"),
        }
    }

    fn dropped_one(&self, why: &'static str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "{why}");
        }
    }

    /// The header and body of an envelope from the broker, verified first when signing is on;
    /// `None` for our own (Redis echoes them) and for anything rejected, which is counted and
    /// logged at a bounded rate (anyone who can reach the broker can send them).
    pub fn open(&self, payload: &Bytes) -> Option<(Header, Bytes)> {
        if self.signer.is_some() && claimed_sender(payload) == Some(self.node.as_bytes()) {
            return None;
        }
        match self.verify(payload) {
            Ok(opened) => Some(opened),
            Err(rejected) => {
                let counter = match rejected.reason() {
                    RejectReason::Decode => &self.malformed,
                    RejectReason::Unauthenticated => &self.unauthenticated,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                static LOG: Sparse = Sparse::new();
                if let Some(suppressed) = LOG.admit() {
                    tracing::warn!(
                        reason = %rejected,
                        suppressed,
                        signed = self.signed(),
                        "cluster envelope rejected; check that every node has the same adapter.cluster_secret"
                    );
                }
                None
            }
        }
    }

    fn verify(&self, payload: &Bytes) -> Result<(Header, Bytes), Rejected> {
        let Some(signer) = &self.signer else {
            if payload.starts_with(SEALED) {
                return Err(Rejected::NoSecret);
            }
            return decode(payload).ok_or(Rejected::Malformed);
        };
        let (node, envelope) = signer.open(payload, unix_millis())?;
        let (header, body) = decode(&envelope).ok_or(Rejected::Malformed)?;
        if header.sender() != node {
            return Err(Rejected::SenderMismatch);
        }
        Ok((header, body))
    }

    /// What this side of the cluster has dropped so far.
    pub fn drops(&self) -> ClusterDrops {
        ClusterDrops {
            out_queue_full: self.dropped.load(Ordering::Relaxed),
            in_decode: self.malformed.load(Ordering::Relaxed),
            in_unauthenticated: self.unauthenticated.load(Ordering::Relaxed),
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

    /// Whether `user` is a member of `channel` on some node.
    pub fn present(&self, app: &str, channel: &str, user: &str) -> bool {
        lock(&self.presence).get(&(app.to_owned(), channel.to_owned())).is_some_and(|m| m.contains_key(user))
    }

    pub fn user_count(&self, app: &str, channel: &str) -> usize {
        lock(&self.presence).get(&(app.to_owned(), channel.to_owned())).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        Cluster::new("me", Arc::new(Lanes::new(16, 16)), Duration::from_millis(100), Duration::from_secs(5), None)
    }

    fn heartbeat(n: &str) -> Header {
        Header::Heartbeat { n: n.into() }
    }

    /// A broker link that does not drain: app a fills its lane and no more, app b and the
    /// node's own envelopes still go, and the publisher takes them in turns.
    #[tokio::test]
    async fn one_app_holds_at_most_its_lane_of_the_outbox() {
        use opentelemetry::metrics::MeterProvider as _;
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::default();
        let metrics = crate::telemetry::Metrics::new(&provider.meter("test"), 0);
        let app = |id: &str| App::new(crate::config::AppConfig { id: id.into(), ..Default::default() }, &metrics);
        let (a, b) = (app("a"), app("b"));
        let lanes = Arc::new(Lanes::new(100, 25));
        let cluster = Cluster::new("me", lanes.clone(), Duration::from_millis(100), Duration::from_secs(5), None);
        for _ in 0..35 {
            cluster.send_for(&a, &heartbeat("me"), b"a");
        }
        assert_eq!(cluster.drops().out_queue_full, 10);
        cluster.send_for(&b, &heartbeat("me"), b"b");
        cluster.send(&heartbeat("me"), b"n");
        assert_eq!(cluster.drops().out_queue_full, 10, "b's and the node's envelopes are queued");
        let mut out = Vec::new();
        lanes.take(&mut out, 3).await;
        let bodies: Vec<&[u8]> = out.iter().map(|e| e.split(|c| *c == b'\n').nth(1).unwrap()).collect();
        assert_eq!(bodies, [&b"n"[..], b"a", b"b"], "the node's first, then a and b in turn");
        cluster.send_for(&a, &heartbeat("me"), b"a");
        assert_eq!(cluster.drops().out_queue_full, 10, "a's lane has room again");
    }

    #[test]
    fn sealed_envelopes_open_only_with_the_secret_in_the_window() {
        let signer = Signer::new(b"0123456789abcdef-cluster", "sockudo").unwrap();
        let now = 1_700_000_000_000;
        let h = Header::Broadcast {
            n: "a".into(),
            a: "app".into(),
            c: "#server-to-user-u".into(),
            x: None,
            o: 0,
            tp: None,
            bg: None,
            cache: false,
            e: "ev".into(),
        };
        let sealed = signer.seal("a", now, &h, b"{\"event\":\"ev\"}");
        let (node, inner) = signer.open(&sealed, now + 29_000).unwrap();
        assert_eq!(node, "a");
        let (back, body) = decode(&inner).unwrap();
        assert_eq!(back.sender(), "a");
        assert_eq!(&body[..], b"{\"event\":\"ev\"}");
        assert_eq!(claimed_sender(&sealed), Some(&b"a"[..]));
        // Outside the window on either side.
        assert_eq!(signer.open(&sealed, now + 31_000), Err(Rejected::Stale));
        assert_eq!(signer.open(&sealed, now - 31_000), Err(Rejected::Stale));
        // Another secret, one flipped body byte, a truncated MAC, no seal at all.
        let other = Signer::new(b"another-secret-of-16+", "sockudo").unwrap();
        assert_eq!(other.open(&sealed, now), Err(Rejected::BadSignature));
        // The same secret for another cluster (broker prefix) on the same broker.
        let neighbour = Signer::new(b"0123456789abcdef-cluster", "other-cluster").unwrap();
        assert_eq!(neighbour.open(&sealed, now), Err(Rejected::BadSignature));
        let mut altered = sealed.to_vec();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(signer.open(&Bytes::from(altered), now), Err(Rejected::BadSignature));
        assert_eq!(signer.open(&sealed.slice(..40), now), Err(Rejected::BadSignature));
        assert_eq!(signer.open(&encode(&h, b"{}"), now), Err(Rejected::Unsigned));
    }

    #[test]
    fn a_signed_cluster_rejects_and_counts_what_it_cannot_trust() {
        let secret = b"0123456789abcdef-cluster";
        let c = Cluster::new(
            "me",
            Arc::new(Lanes::new(16, 16)),
            Duration::from_millis(100),
            Duration::from_secs(5),
            Signer::new(secret, "sockudo").ok(),
        );
        let signer = Signer::new(secret, "sockudo").unwrap();
        let now = unix_millis();
        let good = signer.seal("b", now, &heartbeat("b"), b"");
        assert_eq!(c.open(&good).map(|(h, _)| h.sender().to_owned()), Some("b".into()));
        // Signed as b, but the header claims c: a holder of the secret cannot speak for others.
        assert!(c.open(&signer.seal("b", now, &heartbeat("c"), b"")).is_none());
        assert!(c.open(&encode(&heartbeat("b"), b"")).is_none());
        assert!(c.open(&signer.seal("b", now - 60_000, &heartbeat("b"), b"")).is_none());
        // Our own envelope (Redis echoes it) is skipped, not counted.
        assert!(c.open(&signer.seal("me", now, &heartbeat("me"), b"")).is_none());
        assert_eq!(c.drops(), ClusterDrops { out_queue_full: 0, in_decode: 0, in_unauthenticated: 3 });
        // A trusting cluster counts garbage as decode and a sealed envelope as unauthenticated.
        let plain = cluster();
        assert!(plain.open(&Bytes::from_static(b"garbage")).is_none());
        assert!(plain.open(&good).is_none());
        assert!(plain.open(&encode(&heartbeat("b"), b"")).is_some());
        assert_eq!(plain.drops(), ClusterDrops { out_queue_full: 0, in_decode: 1, in_unauthenticated: 1 });
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
            bg: None,
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
