//! Soak (sockudo only): for M minutes, a population of connections changes at random (opens,
//! graceful and reset closes, subscribes and unsubscribes over public, private and presence
//! channels), while the tool keeps its own model of what the server should hold. At every
//! checkpoint the operations in flight settle (every subscribe acknowledged; an unsubscribe is
//! followed by `pusher:ping`, whose `pusher:pong` says it was processed), the server's `/stats`
//! must reach the model's counts within `--settle` seconds (a close finishes on the server a
//! moment after the client saw it), and then `sockudo_connected` and the sum of
//! `sockudo_active_channels` on `/metrics` must equal them. Any mismatch or failed operation
//! fails the run.
//!
//! Also [`Probe`], the reader of `/stats` and `/metrics` that churn and flood share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::churn;
use crate::pusher::{self, Stage, Target, Ws};
use crate::report::{self, progress};
use crate::sys;

/// sockudo's `GET /stats`: the node's true counts and process resources.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub connections: u64,
    #[serde(default)]
    pub socket_tasks: u64,
    pub channels: u64,
    pub presence_members: u64,
    pub tokio_tasks: u64,
    /// 0 where the platform cannot tell (the server reports null).
    #[serde(deserialize_with = "null_as_zero")]
    pub open_fds: u64,
    #[serde(deserialize_with = "null_as_zero")]
    pub rss_bytes: u64,
}

fn null_as_zero<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

impl Stats {
    /// Connections, channels and presence members.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.connections, self.channels, self.presence_members)
    }

    /// No connection, channel or presence member.
    pub fn is_empty(&self) -> bool {
        self.counts() == (0, 0, 0)
    }

    pub fn describe(&self) -> String {
        format!(
            "connections {}, channels {}, presence members {}, socket tasks {}",
            self.connections, self.channels, self.presence_members, self.socket_tasks
        )
    }
}

/// Reads the server's `/stats` and `/metrics` on its metrics listener.
pub struct Probe {
    http: reqwest::Client,
    base: String,
}

impl Probe {
    /// `None` without a metrics port (other servers have no `/stats`).
    pub fn new(target: &Target, metrics_port: Option<u16>) -> Result<Option<Self>, String> {
        let Some(port) = metrics_port else { return Ok(None) };
        // A connection per request: a pooled one would be an open descriptor (and a task) of the
        // server in one reading and not in another.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let host = if target.host.contains(':') { format!("[{}]", target.host) } else { target.host.clone() };
        Ok(Some(Self { http, base: format!("http://{host}:{port}") }))
    }

    async fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        resp.text().await.map_err(|e| format!("GET {url}: {e}"))
    }

    pub async fn stats(&self) -> Result<Stats, String> {
        let text = self.get("/stats").await?;
        serde_json::from_str(&text).map_err(|e| format!("/stats: {e}: {text}"))
    }

    pub async fn scrape(&self) -> Result<String, String> {
        self.get("/metrics").await
    }

    /// The sum of every series of `name` whose labels include `labels`.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        Ok(metric_sum(&self.scrape().await?, name, labels))
    }

    /// Polls `/stats` until `done` holds or `within` passes; returns the last reading.
    async fn until(&self, within: Duration, done: impl Fn(&Stats) -> bool) -> Result<Stats, String> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.stats().await?;
            if done(&s) || Instant::now() >= deadline {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until the server holds no connection, channel or presence member.
    pub async fn drained(&self, within: Duration) -> Result<Stats, String> {
        self.until(within, Stats::is_empty).await
    }

    /// Waits (bounded) until the server is idle and settled: no connection, channel or presence
    /// member, and tokio tasks and open descriptors unchanged over a second of readings (timers
    /// such as the debounced `subscription_count` run on for a moment after the last socket).
    /// This is the reading a baseline is taken from.
    pub async fn quiescent(&self, within: Duration) -> Result<Stats, String> {
        let deadline = Instant::now() + within;
        let mut steady = 0;
        let mut last = self.stats().await?;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let s = self.stats().await?;
            let same = s.is_empty() && (s.tokio_tasks, s.open_fds) == (last.tokio_tasks, last.open_fds);
            steady = if same { steady + 1 } else { 0 };
            last = s;
            if steady >= 4 || Instant::now() >= deadline {
                return Ok(last);
            }
        }
    }

    /// Waits (bounded) until tokio tasks and open descriptors equal `base`'s: those of closed
    /// sockets (and of the previous request) go a moment after the counts do.
    pub async fn back_to(&self, base: &Stats, within: Duration) -> Result<Stats, String> {
        self.until(within, |s| s.tokio_tasks == base.tokio_tasks && s.open_fds == base.open_fds).await
    }
}

/// The sum of every series of `name` in Prometheus text whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_at(series.find('{').unwrap_or(series.len()));
            let matches = n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if matches {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakParams {
    pub minutes: f64,
    pub min_connections: usize,
    pub max_connections: usize,
    pub public_channels: usize,
    pub private_channels: usize,
    pub presence_channels: usize,
    /// Presence users to draw from (several sockets may join as one user).
    pub users: usize,
    /// Operations in flight at most.
    pub inflight: usize,
    /// Operations started per second at most.
    pub ops_per_second: f64,
    pub checkpoint_seconds: f64,
    pub settle_seconds: f64,
    pub metrics_port: u16,
    pub source_addrs: usize,
}

/// The `soak` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: SoakParams,
    pub seconds: f64,
    /// Completed operations by kind.
    pub operations: BTreeMap<String, u64>,
    pub failures: u64,
    pub first_failures: Vec<String>,
    pub checkpoints: u64,
    /// Checkpoints where `/stats` did not reach the tool's counts within the settle time.
    pub stats_mismatches: u64,
    /// Checkpoints where `sockudo_connected` or the sum of `sockudo_active_channels` differed.
    pub metric_mismatches: u64,
    pub first_mismatches: Vec<String>,
    pub peak_connections: u64,
    pub peak_channels: u64,
    pub peak_presence_members: u64,
    /// `/stats` at the first and last checkpoint (the last with every connection closed).
    pub first_stats: Option<Stats>,
    pub last_stats: Option<Stats>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.failures == 0 && self.stats_mismatches == 0 && self.metric_mismatches == 0 && self.checkpoints > 0
    }

    pub fn print(&self) {
        let mut t = report::Table::new(
            format!(
                "soak: {:.1} min, {}..{} connections, {} public + {} private + {} presence channels, against {}",
                self.params.minutes,
                self.params.min_connections,
                self.params.max_connections,
                self.params.public_channels,
                self.params.private_channels,
                self.params.presence_channels,
                self.server
            ),
            &["figure", "value"],
        );
        t.kv("operations", format!("{} {:?}", self.operations.values().sum::<u64>(), self.operations));
        t.kv("failed operations", self.failures);
        t.kv("checkpoints", self.checkpoints);
        t.kv("/stats mismatches", self.stats_mismatches);
        t.kv("gauge mismatches (connected, active channels)", self.metric_mismatches);
        t.kv(
            "peak connections / channels / presence members",
            format!("{} / {} / {}", self.peak_connections, self.peak_channels, self.peak_presence_members),
        );
        if let (Some(a), Some(b)) = (&self.first_stats, &self.last_stats) {
            t.kv(
                "first / last checkpoint: tasks, fds, RSS KB",
                format!(
                    "{}, {}, {} / {}, {}, {}",
                    a.tokio_tasks,
                    a.open_fds,
                    a.rss_bytes / 1024,
                    b.tokio_tasks,
                    b.open_fds,
                    b.rss_bytes / 1024
                ),
            );
        }
        for m in &self.first_mismatches {
            t.kv("mismatch", m);
        }
        for f in &self.first_failures {
            t.kv("failure", f);
        }
        t.kv("result", if self.passed() { "pass" } else { "FAIL" });
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let params = format!(
            "{:.1} min, {}..{} connections, {}/{}/{} public/private/presence channels, {:.0} ops/s",
            self.params.minutes,
            self.params.min_connections,
            self.params.max_connections,
            self.params.public_channels,
            self.params.private_channels,
            self.params.presence_channels,
            self.params.ops_per_second
        );
        let result = format!(
            "{} operations, {} checkpoints: {} /stats and {} gauge mismatches, {} failed operations; peak {} connections, {} channels",
            self.operations.values().sum::<u64>(),
            self.checkpoints,
            self.stats_mismatches,
            self.metric_mismatches,
            self.failures,
            self.peak_connections,
            self.peak_channels
        );
        (params, result)
    }
}

/// What the soak asks of one connection's task.
enum Cmd {
    Subscribe { channel: String, user: String, done: oneshot::Sender<Result<(), String>> },
    Unsubscribe { channel: String, done: oneshot::Sender<Result<(), String>> },
    Close { reset: bool, done: oneshot::Sender<Result<(), String>> },
}

/// One connection: runs commands and answers the server's pings in between.
async fn peer(mut ws: Ws, target: Target, socket_id: String, mut rx: mpsc::Receiver<Cmd>) {
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Subscribe { channel, user, done }) => {
                    let r = churn::subscribe_with(&mut ws, &target, &socket_id, &channel, &user).await;
                    let _ = done.send(r.map_err(|f| f.to_string()));
                }
                Some(Cmd::Unsubscribe { channel, done }) => {
                    let r = async {
                        let fail = |e: tokio_tungstenite::tungstenite::Error| e.to_string();
                        ws.send(pusher::unsubscribe_msg(&channel)).await.map_err(fail)?;
                        ws.send(Message::text(r#"{"event":"pusher:ping","data":{}}"#)).await.map_err(fail)?;
                        pusher::wait_event(&mut ws, "pusher:pong", None, target.timeout, Stage::Unsubscribe)
                            .await
                            .map_err(|f| f.to_string())
                    };
                    let _ = done.send(r.await);
                }
                Some(Cmd::Close { reset: true, done }) => {
                    churn::reset(ws);
                    let _ = done.send(Ok(()));
                    return;
                }
                Some(Cmd::Close { reset: false, done }) => {
                    let _ = done.send(pusher::close(ws, target.timeout).await.map_err(|f| f.to_string()));
                    return;
                }
                None => return,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if pusher::Frame::parse(t.as_str()).is_some_and(|f| f.event == "pusher:ping") {
                        let _ = ws.send(pusher::pong()).await;
                    }
                }
                Some(Ok(_)) => {}
                // Closed by the server: the next command fails, and the soak counts it.
                _ => return,
            },
        }
    }
}

/// An open connection in the tool's model.
struct Peer {
    tx: mpsc::Sender<Cmd>,
    /// Channel → the presence user it joined as.
    subs: BTreeMap<String, String>,
    /// A command is in flight.
    busy: bool,
}

/// What the tool knows the server holds.
#[derive(Default)]
struct Model {
    peers: BTreeMap<u64, Peer>,
    next_id: u64,
}

impl Model {
    /// Connections, occupied channels and presence members (one per user per channel).
    fn expected(&self) -> (u64, u64, u64) {
        let mut channels = BTreeMap::<&str, BTreeSet<&str>>::new();
        for p in self.peers.values() {
            for (channel, user) in &p.subs {
                channels.entry(channel).or_default().insert(user);
            }
        }
        let members = channels.iter().filter(|(c, _)| c.starts_with("presence-")).map(|(_, u)| u.len() as u64).sum();
        (self.peers.len() as u64, channels.len() as u64, members)
    }

    fn pick_idle(&self, want: impl Fn(&Peer) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self.peers.iter().filter(|(_, p)| !p.busy && want(p)).map(|(id, _)| *id).collect();
        (!ids.is_empty()).then(|| ids[fastrand::usize(..ids.len())])
    }
}

/// A finished operation.
enum Done {
    Opened(Result<mpsc::Sender<Cmd>, String>),
    Subscribed(u64, String, String, Result<(), String>),
    Unsubscribed(u64, String, Result<(), String>),
    Closed(u64, Result<(), String>),
}

/// Failures and their first few texts.
#[derive(Default)]
struct Log {
    count: u64,
    first: Vec<String>,
}

impl Log {
    fn push(&mut self, what: String) {
        self.count += 1;
        if self.first.len() < 10 {
            self.first.push(what);
        }
    }
}

/// Applies a finished operation to the model. A connection whose command failed is reset and
/// dropped from the model, since what the server holds for it is unknown.
fn apply(model: &mut Model, done: Done, ops: &mut BTreeMap<String, u64>, failures: &mut Log) {
    let forget = |model: &mut Model, id: u64| {
        if let Some(p) = model.peers.remove(&id) {
            let (done, _) = oneshot::channel();
            let _ = p.tx.try_send(Cmd::Close { reset: true, done });
        }
    };
    let (kind, result) = match done {
        Done::Opened(Ok(tx)) => {
            model.next_id += 1;
            model.peers.insert(model.next_id, Peer { tx, subs: BTreeMap::new(), busy: false });
            ("open", Ok(()))
        }
        Done::Opened(Err(e)) => ("open", Err(e)),
        Done::Subscribed(id, channel, user, r) => {
            if r.is_err() {
                forget(model, id);
            } else if let Some(p) = model.peers.get_mut(&id) {
                p.busy = false;
                p.subs.insert(channel, user);
            }
            ("subscribe", r)
        }
        Done::Unsubscribed(id, channel, r) => {
            if r.is_err() {
                forget(model, id);
            } else if let Some(p) = model.peers.get_mut(&id) {
                p.busy = false;
                p.subs.remove(&channel);
            }
            ("unsubscribe", r)
        }
        Done::Closed(id, r) => {
            model.peers.remove(&id);
            ("close", r)
        }
    };
    *ops.entry(kind.to_owned()).or_default() += 1;
    if let Err(e) = result {
        failures.push(format!("{kind}: {e}"));
    }
}

/// Runs the `soak` scenario.
pub async fn run(target: &Target, params: SoakParams) -> Result<SoakReport, String> {
    let probe = Probe::new(target, Some(params.metrics_port))?.ok_or("soak needs the metrics port")?;
    let start = probe.stats().await?;
    if !start.is_empty() {
        return Err(format!("the server is not idle ({}); the soak compares absolute counts", start.describe()));
    }
    let mut model = Model::default();
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let mut ops = BTreeMap::new();
    let mut failures = Log::default();
    let mut mismatches = Log::default();
    let (mut stats_mismatches, mut metric_mismatches, mut checkpoints) = (0u64, 0u64, 0u64);
    let mut first_stats = None;
    let last_stats;
    let mut peak = (0u64, 0u64, 0u64);
    let opened = Arc::new(AtomicU64::new(0));
    let checkpoint_every = sys::secs(params.checkpoint_seconds.max(1.0));
    let settle = sys::secs(params.settle_seconds);
    let started = Instant::now();
    let end = started + sys::secs(params.minutes * 60.0);
    let mut next_checkpoint = started + checkpoint_every;
    let mut pace = tokio::time::interval(sys::secs(1.0 / params.ops_per_second.max(0.1)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = Instant::now();
    let max = params.max_connections.max(params.min_connections).max(1);
    loop {
        let now = Instant::now();
        let last = now >= end;
        if now >= next_checkpoint || last {
            if last {
                // The end: every connection closes, and the server must come back to zero.
                for (id, p) in model.peers.iter_mut().filter(|(_, p)| !p.busy) {
                    p.busy = true;
                    let (done, rx) = oneshot::channel();
                    let _ = p.tx.send(Cmd::Close { reset: id % 2 == 0, done }).await;
                    let id = *id;
                    tasks.spawn(async move { Done::Closed(id, rx.await.unwrap_or(Err("peer gone".into()))) });
                }
            }
            // Settle: every operation in flight completes (each is bounded by the timeout).
            while let Some(done) = tasks.join_next().await {
                apply(&mut model, done.map_err(|e| e.to_string())?, &mut ops, &mut failures);
            }
            if last && !model.peers.is_empty() {
                continue;
            }
            checkpoints += 1;
            let want = model.expected();
            peak = (peak.0.max(want.0), peak.1.max(want.1), peak.2.max(want.2));
            let got = probe.until(settle, |s| s.counts() == want).await?;
            if got.counts() != want {
                stats_mismatches += 1;
                mismatches.push(format!(
                    "checkpoint {checkpoints} at {:.0} s: /stats (connections, channels, presence members) {:?}, the tool's {want:?}",
                    started.elapsed().as_secs_f64(),
                    got.counts()
                ));
            }
            let text = probe.scrape().await?;
            let gauges = (
                metric_sum(&text, "sockudo_connected", &[]) as u64,
                metric_sum(&text, "sockudo_active_channels", &[]) as u64,
            );
            if gauges != (want.0, want.1) {
                metric_mismatches += 1;
                mismatches.push(format!(
                    "checkpoint {checkpoints} at {:.0} s: sockudo_connected, sum of sockudo_active_channels {gauges:?}, the tool's {:?}",
                    started.elapsed().as_secs_f64(),
                    (want.0, want.1)
                ));
            }
            first_stats.get_or_insert_with(|| got.clone());
            if last {
                last_stats = Some(got);
                break;
            }
            next_checkpoint = Instant::now() + checkpoint_every;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let (c, ch, m) = model.expected();
            progress(&format!(
                "[soak] {:>5.0}s ops={} connections={c} channels={ch} presence_members={m} checkpoints={checkpoints} mismatches={} failures={}",
                started.elapsed().as_secs_f64(),
                ops.values().sum::<u64>(),
                stats_mismatches + metric_mismatches,
                failures.count
            ));
        }
        if tasks.len() >= params.inflight.max(1) {
            if let Some(done) = tasks.join_next().await {
                apply(&mut model, done.map_err(|e| e.to_string())?, &mut ops, &mut failures);
            }
            continue;
        }
        // Pace the operations, but collect finished ones meanwhile.
        tokio::select! {
            _ = pace.tick() => {}
            Some(done) = tasks.join_next() => {
                apply(&mut model, done.map_err(|e| e.to_string())?, &mut ops, &mut failures);
                continue;
            }
        }
        let live = model.peers.len();
        let roll = fastrand::u32(..100);
        if live < params.min_connections || (live < max && roll < 20) {
            let (target, sources, opened) = (target.clone(), params.source_addrs, opened.clone());
            tasks.spawn(async move {
                let source = target.source_for(opened.fetch_add(1, Relaxed) as usize, sources);
                Done::Opened(churn::connect(&target, source).await.map_err(|f| f.to_string()).map(|(ws, welcome)| {
                    let (tx, rx) = mpsc::channel(4);
                    tokio::spawn(peer(ws, target.clone(), welcome.socket_id, rx));
                    tx
                }))
            });
        } else if live > max || roll < 35 {
            if let Some(id) = model.pick_idle(|_| true) {
                let p = model.peers.get_mut(&id).ok_or("picked peer")?;
                p.busy = true;
                let (done, rx) = oneshot::channel();
                let _ = p.tx.send(Cmd::Close { reset: roll % 2 == 0, done }).await;
                tasks.spawn(async move { Done::Closed(id, rx.await.unwrap_or(Err("peer gone".into()))) });
            }
        } else if roll < 75 {
            let channel = pick_channel(&params);
            if let Some(id) = model.pick_idle(|p| !p.subs.contains_key(&channel)) {
                let p = model.peers.get_mut(&id).ok_or("picked peer")?;
                p.busy = true;
                let user = format!("user-{}", fastrand::usize(..params.users.max(1)));
                let (done, rx) = oneshot::channel();
                let _ = p.tx.send(Cmd::Subscribe { channel: channel.clone(), user: user.clone(), done }).await;
                tasks.spawn(
                    async move { Done::Subscribed(id, channel, user, rx.await.unwrap_or(Err("peer gone".into()))) },
                );
            }
        } else if let Some(id) = model.pick_idle(|p| !p.subs.is_empty()) {
            let p = model.peers.get_mut(&id).ok_or("picked peer")?;
            p.busy = true;
            let channel = p.subs.keys().nth(fastrand::usize(..p.subs.len())).cloned().unwrap_or_default();
            let (done, rx) = oneshot::channel();
            let _ = p.tx.send(Cmd::Unsubscribe { channel: channel.clone(), done }).await;
            tasks.spawn(async move { Done::Unsubscribed(id, channel, rx.await.unwrap_or(Err("peer gone".into()))) });
        }
    }
    let mut first_mismatches = mismatches.first;
    first_mismatches.truncate(10);
    Ok(SoakReport {
        scenario: "soak",
        server: format!("{}:{}", target.host, target.port),
        seconds: started.elapsed().as_secs_f64(),
        operations: ops,
        failures: failures.count,
        first_failures: failures.first,
        checkpoints,
        stats_mismatches,
        metric_mismatches,
        first_mismatches,
        peak_connections: peak.0,
        peak_channels: peak.1,
        peak_presence_members: peak.2,
        first_stats,
        last_stats,
        params,
    })
}

/// A random channel: public, private and presence in proportion to their numbers.
fn pick_channel(p: &SoakParams) -> String {
    let total = (p.public_channels + p.private_channels + p.presence_channels).max(1);
    let i = fastrand::usize(..total);
    if i < p.public_channels {
        format!("soak-{i}")
    } else if i < p.public_channels + p.private_channels {
        format!("private-soak-{}", i - p.public_channels)
    } else {
        format!("presence-soak-{}", i - p.public_channels - p.private_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series() {
        let text = "# TYPE sockudo_active_channels gauge\n\
            sockudo_active_channels{app_id=\"a\",channel_type=\"public\"} 3\n\
            sockudo_active_channels{app_id=\"a\",channel_type=\"presence\"} 2\n\
            sockudo_active_channels_other 9\n";
        assert_eq!(metric_sum(text, "sockudo_active_channels", &[]), 5.0);
        assert_eq!(metric_sum(text, "sockudo_active_channels", &[("channel_type", "presence")]), 2.0);
    }

    #[test]
    fn reads_stats_with_nulls() {
        let s: Stats = serde_json::from_str(
            r#"{"connections":1,"socket_tasks":1,"channels":2,"presence_members":0,"tokio_tasks":9,"open_fds":null,"rss_bytes":4096}"#,
        )
        .expect("stats");
        assert_eq!((s.counts(), s.open_fds, s.rss_bytes), ((1, 2, 0), 0, 4096));
    }

    #[test]
    fn counts_presence_members_once_per_user() {
        let mut m = Model::default();
        for (id, user) in [(1, "u1"), (2, "u1"), (3, "u2")] {
            let (tx, _) = mpsc::channel(1);
            let subs = BTreeMap::from([("presence-x".to_owned(), user.to_owned()), (format!("c{id}"), String::new())]);
            m.peers.insert(id, Peer { tx, subs, busy: false });
        }
        assert_eq!(m.expected(), (3, 4, 2));
    }
}
