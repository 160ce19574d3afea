//! Webhooks that survive a crash: with `webhooks.queue_driver` `redis` or `nats`, every
//! batched request is written to the broker before anything sends it, and removed only when
//! its receiver answered 2xx or its retries ran out (then it goes to the dead letters).
//!
//! Three tasks per node:
//! - the **journal** takes the batcher's requests and appends them in order ([`Queue::append`]).
//!   While the broker is down they wait here, still holding their places under the node's
//!   and their app's bounds (so the buffer is bounded and new events beyond it are dropped and
//!   counted), and readiness reports the queue unavailable until they are written. A request the broker refuses (its
//!   app's or the whole queue's bound) is dropped and counted.
//! - the **consumer** takes requests from the broker, new ones and (every half
//!   `claim_idle_ms`) ones another node took and stopped working on, and delivers each with
//!   [`sender::deliver`] under the usual permits. While it works on one it keeps the broker
//!   from handing it to another node. It holds at most `CAP_PER_WORKER × workers` requests,
//!   and `CAP_PER_APP_IN_FLIGHT × max_in_flight_per_app` of one app: one it has no room for is
//!   released, to come back later, so that one app's dead receiver cannot fill the node.
//! - the **depth** task reads each app's events in the broker's queue once a second into
//!   `webhook_queue_events` (plus the events this node has not written yet).
//!
//! A request's id (`X-Sockudo-Webhook-Id`) is fixed when it is batched, so a request sent
//! again after a crash or a lost acknowledgement carries the same id and the same body.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::nats_queue::NatsQueue;
use super::redis_queue::RedisQueue;
use super::sender::{self, Finished, Job};
use super::{Held, Phase, Shared, Webhooks};
use crate::app::App;
use crate::config::{Config, ConfigError, QueueDriver};
use crate::telemetry::WebhookOutcome;

/// The consumer polls Redis this often when it has nothing (its own appends wake it at once).
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(100);
/// Requests a node holds at once, per worker and per request of one app in flight.
const CAP_PER_WORKER: usize = 4;
const CAP_PER_APP_IN_FLIGHT: usize = 4;
/// Requests the journal appends in one round trip.
const APPEND_BATCH: usize = 64;
/// An append the broker has not answered within this is a failure (retried, with the same ids).
const APPEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The broker could not be reached or answered with an error.
#[derive(Debug)]
pub(crate) struct Broken(pub String);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One batched request as the broker keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: Arc<str>,
    pub app: String,
    /// Index of the webhook in the app's `webhooks`.
    pub target: usize,
    /// Of the webhook's URL: a request for a webhook that has changed since is not sent.
    pub fingerprint: String,
    pub events: usize,
    pub bytes: usize,
    pub traceparent: Option<Arc<str>>,
    pub baggage: Option<Arc<str>>,
    /// `{"time_ms": ..., "events": [...]}`, signed again at each delivery (with the app's
    /// current secret).
    pub body: Bytes,
}

/// The queue's bounds: the same settings as the memory queue's, here over the broker's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub app_events: usize,
    pub app_bytes: usize,
    pub total_events: usize,
}

pub(crate) enum Appended {
    Stored,
    /// Over a bound: the request is dropped.
    Full,
}

/// How to acknowledge a request taken from the broker.
pub(crate) enum Receipt {
    Redis(String),
    Nats(Box<async_nats::jetstream::Message>),
}

pub(crate) struct Taken {
    pub entry: Entry,
    pub receipt: Receipt,
}

pub(crate) enum Queue {
    Redis(RedisQueue),
    // Boxed: the JetStream handles are large, and a queue is made once per node.
    Nats(Box<NatsQueue>),
}

impl Queue {
    /// Connects to the broker of `driver`; `None` for the memory queue. An unreachable broker
    /// is a configuration error naming its key, as for the adapter.
    pub async fn connect(config: &Config, node: &str) -> Result<Option<Self>, ConfigError> {
        let w = &config.webhooks;
        let claim_idle = Duration::from_millis(w.claim_idle_ms);
        let fail = |key: &str, e: &dyn std::fmt::Display| {
            ConfigError::new(key, format!("webhooks.queue_driver {}: {e}", w.queue(config.adapter.driver).as_str()))
        };
        match w.queue(config.adapter.driver) {
            QueueDriver::Memory => Ok(None),
            QueueDriver::Redis => {
                let r = &config.adapter.redis;
                let redis = crate::redis_client::Redis::from_config(r).map_err(|e| fail(e.key, &e))?;
                let queue = RedisQueue::connect(redis, &r.prefix, node, claim_idle)
                    .await
                    .map_err(|e| fail("adapter.redis.url", &e))?;
                Ok(Some(Queue::Redis(queue)))
            }
            QueueDriver::Nats => {
                let n = &config.adapter.nats;
                let client = crate::nats_client::connect(n, |_| async {}).await.map_err(|e| fail(e.key, &e))?;
                let queue = NatsQueue::connect(client, &n.prefix, claim_idle, &bounds(config), w.dead_letter_max)
                    .await
                    .map_err(|e| fail("adapter.nats.servers", &e))?;
                Ok(Some(Queue::Nats(Box::new(queue))))
            }
        }
    }

    async fn append(&self, entries: &[&Entry], bounds: &Bounds) -> Result<Vec<Appended>, Broken> {
        match self {
            Queue::Redis(q) => q.append(entries, bounds).await,
            Queue::Nats(q) => q.append(entries).await,
        }
    }

    /// Up to `max` requests. Redis answers at once (`claim`: idle ones instead of
    /// new ones); NATS waits up to `IDLE_POLL × 10` for the first and redelivers idle ones on
    /// its own.
    async fn take(&self, max: usize, claim: bool) -> Result<Vec<Taken>, Broken> {
        match self {
            Queue::Redis(q) => q.take(max, claim).await,
            Queue::Nats(q) => q.take(max, IDLE_POLL * 10).await,
        }
    }

    async fn keep(&self, receipt: &Receipt) -> Result<(), Broken> {
        match (self, receipt) {
            (Queue::Redis(q), Receipt::Redis(id)) => q.keep(id).await,
            (Queue::Nats(_), Receipt::Nats(m)) => NatsQueue::keep(m).await,
            _ => Ok(()),
        }
    }

    /// Leaves the request for later (Redis: it is claimed once idle; NATS: redelivered after
    /// `after`).
    async fn release(&self, receipt: &Receipt, after: Duration) {
        if let Receipt::Nats(m) = receipt {
            NatsQueue::release(m, after).await;
        }
    }

    async fn finish(&self, taken: &Taken, dead: Option<usize>) -> Result<(), Broken> {
        match (self, &taken.receipt) {
            (Queue::Redis(q), Receipt::Redis(id)) => q.finish(id, &taken.entry, dead).await,
            (Queue::Nats(q), Receipt::Nats(m)) => q.finish(m, &taken.entry, dead.is_some()).await,
            _ => Ok(()),
        }
    }

    async fn depth(&self) -> Result<Vec<(String, i64)>, Broken> {
        match self {
            Queue::Redis(q) => q.depth().await,
            Queue::Nats(q) => q.depth().await,
        }
    }

    async fn replay(&self, app: Option<&str>, bounds: &Bounds) -> Result<usize, Broken> {
        match self {
            Queue::Redis(q) => q.replay(app, bounds).await,
            Queue::Nats(q) => q.replay(app).await,
        }
    }
}

pub(crate) fn bounds(config: &Config) -> Bounds {
    let w = &config.webhooks;
    Bounds {
        app_events: w.max_queue_events_per_app,
        app_bytes: w.max_queue_kb_per_app.saturating_mul(1024),
        total_events: w.queue_size,
    }
}

/// `sockudo webhooks replay`: moves the dead letters (of `app`, when given) back into the
/// queue; returns how many.
pub async fn replay(config: &Config, app: Option<&str>) -> Result<usize, ConfigError> {
    let node = format!("replay-{:08x}", fastrand::u32(..));
    let Some(queue) = Queue::connect(config, &node).await? else {
        return Err(ConfigError::new("webhooks.queue_driver", "is memory: no dead letters are kept to replay"));
    };
    queue.replay(app, &bounds(config)).await.map_err(|e| ConfigError::new("webhooks.queue_driver", e.to_string()))
}

/// A request on its way to the broker, holding its events' places until it is there.
pub(crate) struct Pending {
    pub entry: Entry,
    pub held: Held,
}

/// The durable queue of one node.
pub(crate) struct Durable {
    queue: Queue,
    bounds: Bounds,
    dead_letter_max: usize,
    claim_idle: Duration,
    pub(crate) journal: mpsc::Sender<Pending>,
    /// False while the journal holds requests the broker will not take: readiness. (A failed
    /// read only delays deliveries; it makes no node unfit for traffic.)
    available: AtomicBool,
    /// The journal appended: the consumer need not wait for its next poll.
    appended: Notify,
    /// The consumer's room: requests held, in all and by app.
    held: AtomicUsize,
    held_by_app: Mutex<HashMap<String, usize>>,
    freed: Notify,
    cap: usize,
    cap_per_app: usize,
    /// Broker errors, for sparse logging.
    errors: AtomicUsize,
}

impl Durable {
    pub fn new(queue: Queue, config: &Config) -> (Arc<Self>, mpsc::Receiver<Pending>) {
        let w = &config.webhooks;
        let (journal, rx) = mpsc::channel(w.queue_size.max(1));
        let durable = Arc::new(Self {
            queue,
            bounds: bounds(config),
            dead_letter_max: w.dead_letter_max,
            claim_idle: Duration::from_millis(w.claim_idle_ms.max(1)),
            journal,
            available: AtomicBool::new(true),
            appended: Notify::new(),
            held: AtomicUsize::new(0),
            held_by_app: Mutex::new(HashMap::new()),
            freed: Notify::new(),
            cap: (w.workers * CAP_PER_WORKER).max(1),
            cap_per_app: (w.max_in_flight_per_app.min(w.workers) * CAP_PER_APP_IN_FLIGHT).max(1),
            errors: AtomicUsize::new(0),
        });
        (durable, rx)
    }

    /// Whether events can reach the broker's queue (readiness): false while some wait on this
    /// node because the broker does not take them.
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    fn broke(&self, what: &str, e: &Broken) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(error = %e, errors = n, "webhook queue: {what} failed; retrying");
        }
    }

    /// The journal wrote what waited: ready again.
    fn written(&self) {
        if !self.available.swap(true, Ordering::AcqRel) {
            tracing::info!("webhook queue reachable again; the events that waited are written");
        }
    }
}

/// Appends the batcher's requests in order until `closing` is set and nothing is left, or
/// shutdown gives up.
pub(crate) async fn journal(
    mut rx: mpsc::Receiver<Pending>,
    durable: Arc<Durable>,
    shared: Arc<Shared>,
    mut closing: watch::Receiver<bool>,
) {
    let mut buf: VecDeque<Pending> = VecDeque::new();
    let mut backoff = Duration::from_millis(50);
    let mut phase = shared.phase.clone();
    loop {
        if buf.is_empty() {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => buf.push_back(p),
                    None => return,
                },
                _ = closing.wait_for(|c| *c) => match rx.try_recv() {
                    Ok(p) => buf.push_back(p),
                    Err(_) => return,
                },
            }
        }
        while buf.len() < APPEND_BATCH {
            match rx.try_recv() {
                Ok(p) => buf.push_back(p),
                Err(_) => break,
            }
        }
        let entries: Vec<&Entry> = buf.iter().take(APPEND_BATCH).map(|p| &p.entry).collect();
        // Bounded: a NATS client buffers publishes while it reconnects and answers only when
        // its own timeout ends; readiness should not wait for that.
        let appended = tokio::time::timeout(APPEND_TIMEOUT, durable.queue.append(&entries, &durable.bounds))
            .await
            .unwrap_or_else(|_| Err(Broken("no answer from the broker in time".into())));
        match appended {
            Ok(results) => {
                durable.written();
                backoff = Duration::from_millis(50);
                for result in results {
                    let Some(p) = buf.pop_front() else { break };
                    if let Appended::Full = result {
                        for _ in 0..p.entry.events {
                            shared.metrics.webhook(&p.held.app.attrs, WebhookOutcome::Dropped);
                        }
                        tracing::warn!(app_id = %p.entry.app, events = p.entry.events, "webhook queue full for this app; request dropped");
                    }
                    // Dropping `p` gives its places back: the broker has the events now.
                }
                durable.appended.notify_one();
            }
            Err(e) => {
                durable.available.store(false, Ordering::Release);
                durable.broke("append", &e);
                if *phase.borrow() == Phase::Abort {
                    for p in buf.drain(..) {
                        for _ in 0..p.entry.events {
                            shared.metrics.webhook(&p.held.app.attrs, WebhookOutcome::Failed);
                        }
                    }
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = phase.wait_for(|p| *p == Phase::Abort) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Takes requests from the broker and starts their deliveries until shutdown.
pub(crate) async fn consume(webhooks: Arc<Webhooks>, durable: Arc<Durable>) {
    let mut phase = webhooks.shared.phase.clone();
    let mut last_claim = Instant::now();
    loop {
        if *phase.borrow() != Phase::Running {
            return;
        }
        let room = durable.cap.saturating_sub(durable.held.load(Ordering::Acquire));
        if room == 0 {
            tokio::select! {
                () = durable.freed.notified() => {}
                _ = phase.changed() => {}
            }
            continue;
        }
        let claim = last_claim.elapsed() >= durable.claim_idle / 2;
        if claim {
            last_claim = Instant::now();
        }
        let taken = tokio::select! {
            t = durable.queue.take(room, claim) => t,
            _ = phase.changed() => continue,
        };
        match taken {
            Ok(list) if list.is_empty() && !claim => {
                if let Queue::Redis(_) = durable.queue {
                    tokio::select! {
                        () = durable.appended.notified() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                        _ = phase.changed() => {}
                    }
                }
            }
            Ok(list) => {
                for taken in list {
                    durable.held.fetch_add(1, Ordering::AcqRel);
                    let token = webhooks.shared.tasks.token();
                    tokio::spawn(handle(webhooks.clone(), durable.clone(), taken, token));
                }
            }
            Err(e) => {
                durable.broke("read", &e);
                tokio::select! {
                    () = tokio::time::sleep(IDLE_POLL * 5) => {}
                    _ = phase.changed() => {}
                }
            }
        }
    }
}

/// A request's place in the consumer's room, given back on drop.
struct Slot<'a> {
    durable: &'a Durable,
    app: Option<String>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(app) = &self.app {
            let mut by_app = self.durable.held_by_app.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = by_app.get_mut(app) {
                *n -= 1;
                if *n == 0 {
                    by_app.remove(app);
                }
            }
        }
        self.durable.held.fetch_sub(1, Ordering::AcqRel);
        self.durable.freed.notify_one();
    }
}

impl<'a> Slot<'a> {
    /// Counts the request against its app's room; `false` when that is full.
    fn take_app(&mut self, app: &str) -> bool {
        let mut by_app = self.durable.held_by_app.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_app.entry(app.to_owned()).or_insert(0);
        if *n >= self.durable.cap_per_app {
            return false;
        }
        *n += 1;
        self.app = Some(app.to_owned());
        true
    }
}

/// Delivers one request taken from the broker and acknowledges it as it ended.
async fn handle(webhooks: Arc<Webhooks>, durable: Arc<Durable>, taken: Taken, token: crate::shutdown::TaskToken) {
    let mut slot = Slot { durable: &durable, app: None };
    let queue = &durable.queue;
    if !slot.take_app(&taken.entry.app) {
        queue.release(&taken.receipt, durable.claim_idle).await;
        return;
    }
    let app = match webhooks.apps.lookup_by_id(&taken.entry.app).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            tracing::warn!(app_id = %taken.entry.app, "webhook request of an unknown app moved to the dead letters");
            finish(&durable, &taken, true).await;
            return;
        }
        Err(_) => {
            queue.release(&taken.receipt, durable.claim_idle).await;
            return;
        }
    };
    let Some(job) = job(&webhooks, &app, &taken.entry) else {
        tracing::warn!(app_id = %app.id, webhook = taken.entry.target, "webhook changed or removed since the request was queued; moved to the dead letters");
        webhooks.shared.metrics.webhook(&app.attrs, WebhookOutcome::Failed);
        finish(&durable, &taken, true).await;
        return;
    };
    let finished = tokio::select! {
        f = sender::deliver(webhooks.shared.clone(), job, token) => f,
        () = keep(&durable, &taken.receipt) => Finished::Left,
    };
    match finished {
        Finished::Done(WebhookOutcome::Delivered) => finish(&durable, &taken, false).await,
        Finished::Done(_) => finish(&durable, &taken, true).await,
        Finished::Left => queue.release(&taken.receipt, Duration::ZERO).await,
    }
}

/// The delivery job of `entry`, if its webhook is still the one it was queued for.
fn job(webhooks: &Webhooks, app: &Arc<App>, entry: &Entry) -> Option<Job> {
    let hooks = webhooks.hooks(app)?;
    let target = hooks.targets.iter().find(|t| t.index == entry.target && t.fingerprint == entry.fingerprint)?;
    let body = std::str::from_utf8(&entry.body).ok()?;
    Some(Job {
        id: entry.id.clone(),
        durable: true,
        target: target.clone(),
        signature: crate::auth::sign(app.secret(), body),
        body: entry.body.clone(),
        traceparent: entry.traceparent.clone(),
        baggage: entry.baggage.clone(),
        // Its events are counted in the broker's depth, not here.
        held: Held::none(&webhooks.shared, &hooks.share, app),
    })
}

/// Keeps the broker from handing the request to another node, for as long as it is polled.
async fn keep(durable: &Durable, receipt: &Receipt) {
    let every = (durable.claim_idle / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = durable.queue.keep(receipt).await {
            durable.broke("keep-alive", &e);
        }
    }
}

async fn finish(durable: &Durable, taken: &Taken, dead: bool) {
    let dead = dead.then_some(durable.dead_letter_max);
    // A lost acknowledgement means the request is sent again, with the same id.
    for attempt in 0..3 {
        match durable.queue.finish(taken, dead).await {
            Ok(()) => return,
            Err(e) if attempt == 2 => durable.broke("acknowledge", &e),
            Err(_) => tokio::time::sleep(IDLE_POLL * (attempt + 1)).await,
        }
    }
}

/// Reads each app's depth in the broker's queue into `webhook_queue_events` once a second.
pub(crate) async fn depth(webhooks: Arc<Webhooks>, durable: Arc<Durable>) {
    let mut reported: HashMap<String, (Arc<App>, i64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut phase = webhooks.shared.phase.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = phase.changed() => return,
        }
        let now = match durable.queue.depth().await {
            Ok(d) => d,
            Err(e) => {
                durable.broke("depth", &e);
                continue;
            }
        };
        let mut seen: HashMap<String, i64> = now.into_iter().collect();
        let metrics = &webhooks.shared.metrics;
        for (id, (app, shown)) in reported.iter_mut() {
            let n = seen.remove(id).unwrap_or(0);
            metrics.webhooks_depth_changed(&app.attrs, n - *shown);
            *shown = n;
        }
        for (id, n) in seen {
            if let Ok(Some(app)) = webhooks.apps.lookup_by_id(&id).await {
                metrics.webhooks_depth_changed(&app.attrs, n);
                reported.insert(id, (app, n));
            }
        }
        reported.retain(|_, (_, n)| *n != 0);
    }
}
