//! Webhooks: tells each app's backend about channel, presence, client and cache events with
//! signed HTTP POSTs in Pusher's format (`{"time_ms": ..., "events": [...]}`).
//!
//! [`Webhooks::emit`] is called by the adapter on socket and API paths, so it is synchronous and
//! never waits: it filters by each URL's `event_types` and `try_send`s into one bounded queue.
//! An event (queued, batching, in flight or waiting to be retried) holds a place under two
//! bounds: the node's `webhooks.queue_size` events, and its app's [`Share`] of
//! `max_queue_events_per_app` events and `max_queue_kb_per_app` KiB of serialised events.
//! Beyond either, new events are dropped and counted for their app
//! (`webhooks_total{outcome="dropped"}`); `webhook_queue_events` shows each app's depth. Clients
//! without credentials can cause `channel_occupied`/`channel_vacated` at will, and an app whose
//! receiver never answers keeps its events for minutes of retries: the per-app bound keeps such
//! an app from filling the queue for the others.
//!
//! One batcher task groups events by app and URL for `batch_ms` and hands each batch to a
//! delivery task ([`sender`]). A request needs its app's permit (`max_in_flight_per_app`) and
//! then one of the `workers` permits ([`permits`]), so a hung receiver holds at most its app's
//! share of the workers, and apps take turns for the rest; a batch waiting for its next retry
//! holds neither. On shutdown the queue stops accepting, the batcher flushes everything,
//! retries still waiting are tried once more, and whatever has not finished by the deadline is
//! given up (counted `failed`).
//!
//! The config file's webhooks are checked at startup ([`validate`], exit 64 on error); each
//! app's webhooks are compiled on first use and again when the app is replaced (apps from a
//! database change at run time), and an invalid one from a database is logged and skipped.

mod durable;
mod event;
mod nats_queue;
mod redis_queue;
mod sender;

pub use durable::replay;
pub use event::{EventKind, WebhookEvent};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{mpsc, watch, Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::{App, AppManager};
use crate::config::{Config, ConfigError, WebhookConfig};
use crate::shutdown::Tracker;
use crate::telemetry::{Metrics, WebhookOutcome};

/// Events in one request at most; a fuller batch is sent before its window ends.
const MAX_BATCH_EVENTS: usize = 100;
/// Body bytes of one request, roughly, at most (one event larger than this still goes alone).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Headers every request gets from the server; a webhook's `headers` may not set them.
const RESERVED_HEADERS: [&str; 6] =
    ["content-type", "x-pusher-key", "x-pusher-signature", "x-sockudo-webhook-id", "traceparent", "baggage"];

/// One webhook URL of an app, checked and parsed once per `App`.
pub(crate) struct Target {
    /// Index among all targets: the batcher's grouping key.
    id: usize,
    /// Index in the app's `webhooks`, and a digest of its URL: how a request in a broker's
    /// queue names its target to whichever node delivers it.
    index: usize,
    fingerprint: String,
    url: reqwest::Url,
    /// The URL without credentials, query or fragment: safe for spans and logs.
    shown: String,
    /// `EventKind::bit`s this URL wants.
    mask: u8,
    headers: HeaderMap,
}

/// The webhook targets of one app, compiled from one `App`'s settings.
struct AppHooks {
    /// The `App` these were compiled from: apps from a database are replaced by a new `App`
    /// when their row changes, and then compiled again. Holding the `Weak` keeps the address
    /// from being reused, so comparing addresses is an identity test.
    app: Weak<App>,
    /// Union of the targets' masks: one test answers "does anyone want this?".
    mask: u8,
    targets: Vec<Arc<Target>>,
    /// The app's share of the queue and senders; carried over when the app is compiled again,
    /// so that a replaced `App` does not get a second share while its old events are pending.
    share: Arc<Share>,
}

/// One app's share of the queue and of the senders.
pub(crate) struct Share {
    /// Events of this app holding a place ([`Held`]), under `max_queue_events_per_app`.
    events: AtomicUsize,
    /// Their serialised size, under `max_queue_kb_per_app`.
    bytes: AtomicUsize,
    /// One per request of this app in flight: `max_in_flight_per_app`, at most `workers`.
    in_flight: Semaphore,
}

impl Share {
    fn new(in_flight: usize) -> Self {
        Self { events: AtomicUsize::new(0), bytes: AtomicUsize::new(0), in_flight: Semaphore::new(in_flight) }
    }

    /// Takes a place for one event of `bytes`, or refuses when the share is full. An event
    /// larger than the whole byte share is taken when the app holds nothing else, so that it
    /// can still be delivered alone (its size is bounded by the message limits).
    fn take(&self, bytes: usize, max_events: usize, max_bytes: usize) -> bool {
        let events =
            self.events.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_events).then_some(n + 1));
        if events.is_err() {
            return false;
        }
        let fits = |n: usize| (n == 0 || n.saturating_add(bytes) <= max_bytes).then_some(n + bytes);
        if self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits).is_err() {
            self.events.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give_back(&self, events: usize, bytes: usize) {
        self.events.fetch_sub(events, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The places some events of one app hold under the node's and their app's bounds, from
/// admission until they are delivered or given up, and their part of the queue gauge. Given
/// back on drop, so that however the batcher or a delivery task ends (even aborted or by a
/// panic) nothing stays counted.
pub(crate) struct Held {
    shared: Arc<Shared>,
    share: Arc<Share>,
    app: Arc<App>,
    events: usize,
    bytes: usize,
}

impl Held {
    /// No places: a request read back from a broker's queue, whose events the broker counts.
    fn none(shared: &Arc<Shared>, share: &Arc<Share>, app: &Arc<App>) -> Self {
        Self { shared: shared.clone(), share: share.clone(), app: app.clone(), events: 0, bytes: 0 }
    }

    /// Takes over `other`'s places (an event joining a batch of the same app).
    fn merge(&mut self, mut other: Held) {
        self.events += std::mem::take(&mut other.events);
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.events == 0 {
            return;
        }
        self.shared.pending.fetch_sub(self.events, Ordering::AcqRel);
        self.share.give_back(self.events, self.bytes);
        self.shared.metrics.webhooks_unqueued(&self.app.attrs, self.events);
    }
}

/// An event on its way to one target.
struct Queued {
    target: Arc<Target>,
    event: Arc<str>,
    traceparent: Option<Arc<str>>,
    baggage: Option<Arc<str>>,
    held: Held,
}

/// Where shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Flush everything now; retries waiting for their backoff are tried at once.
    Draining,
    /// The deadline passed: whatever is still pending gives up.
    Abort,
}

/// What delivery tasks share.
pub(crate) struct Shared {
    client: reqwest::Client,
    /// One per concurrent request (`webhooks.workers`); taken after the app's own permit.
    workers: Semaphore,
    metrics: Arc<Metrics>,
    /// Events accepted and not yet delivered or given up, for the `queue_size` bound.
    pending: AtomicUsize,
    max_retry: Duration,
    phase: watch::Receiver<Phase>,
    /// Live delivery tasks; shutdown waits for them.
    tasks: Tracker,
    /// The broker's queue, when `webhooks.queue_driver` is `redis` or `nats`.
    durable: Option<Arc<durable::Durable>>,
}

/// The webhook queue and its senders.
pub struct Webhooks {
    /// Where a request read back from a broker's queue finds its app.
    apps: Arc<AppManager>,
    /// Compiled targets by app id, filled on first use. Read-locked for a lookup only (an app
    /// without webhooks never gets here); written when an app is first seen or has changed.
    hooks: RwLock<HashMap<String, Arc<AppHooks>>>,
    next_target: AtomicUsize,
    tx: mpsc::Sender<Queued>,
    shared: Arc<Shared>,
    queue_size: usize,
    /// An app's share: events, bytes and requests in flight.
    app_events: usize,
    app_bytes: usize,
    app_in_flight: usize,
    accepting: AtomicBool,
    phase: watch::Sender<Phase>,
    batcher: Mutex<Option<JoinHandle<()>>>,
    /// A broker queue's journal, told to finish once the batcher has flushed.
    journal: Mutex<Option<JoinHandle<()>>>,
    journal_closing: watch::Sender<bool>,
    /// Events dropped, for sparse logging (the metric counts every one).
    dropped: AtomicU64,
}

/// Checks the `webhooks` settings and the webhooks of the config file's apps; the error names
/// the key at fault. Messages never repeat a URL or a header value (either may hold a
/// credential). Apps from a database are checked when first used instead (see [`Webhooks`]).
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let w = &config.webhooks;
    for (key, value) in [
        ("webhooks.queue_size", w.queue_size),
        ("webhooks.max_queue_events_per_app", w.max_queue_events_per_app),
        ("webhooks.max_queue_kb_per_app", w.max_queue_kb_per_app),
        ("webhooks.workers", w.workers),
        ("webhooks.max_in_flight_per_app", w.max_in_flight_per_app),
    ] {
        if value == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    if w.timeout_ms == 0 {
        return Err(ConfigError::new("webhooks.timeout_ms", "must be at least 1"));
    }
    private_roots(&w.ca_path)?;
    if config.app_manager.driver == "config" {
        for (i, app) in config.app_manager.array.apps.iter().enumerate() {
            for (j, hook) in app.webhooks.iter().enumerate() {
                compile(hook, 0, j).map_err(|(field, message)| {
                    ConfigError::new(format!("app_manager.array.apps[{i}].webhooks[{j}].{field}"), message)
                })?;
            }
        }
    }
    Ok(())
}

/// The CA certificates of `webhooks.ca_path` (none when it is empty), trusted besides the
/// system's roots so that receivers behind a private CA can be reached over HTTPS.
fn private_roots(path: &str) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let fail = |message: String| ConfigError::new("webhooks.ca_path", message);
    let pem = std::fs::read(path).map_err(|e| fail(format!("cannot read {path}: {e}")))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(format!("{path}: {e}")))?;
    if roots.is_empty() {
        return Err(fail(format!("no PEM certificate in {path}")));
    }
    Ok(roots)
}

/// One webhook's target (the app's `index`th), or the field at fault and why.
fn compile(hook: &WebhookConfig, id: usize, index: usize) -> Result<Target, (&'static str, String)> {
    let url = reqwest::Url::parse(&hook.url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or(("url", "must be an absolute http:// or https:// URL".to_owned()))?;
    let mut mask = 0;
    for name in &hook.event_types {
        let kind = EventKind::parse(name).ok_or_else(|| {
            let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            ("event_types", format!("unknown event type {name:?}; expected one of {}", known.join(", ")))
        })?;
        mask |= kind.bit();
    }
    if hook.event_types.is_empty() {
        mask = EventKind::ALL.iter().fold(0, |m, k| m | k.bit());
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &hook.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ("headers", format!("{name:?} is not a valid header name")))?;
        if RESERVED_HEADERS.contains(&n.as_str()) {
            return Err(("headers", format!("{name:?} is set by the server")));
        }
        let mut v =
            HeaderValue::from_str(value).map_err(|_| ("headers", format!("the value of {name:?} is not valid")))?;
        v.set_sensitive(true);
        headers.insert(n, v);
    }
    let fingerprint = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(url.as_str().as_bytes())[..8])
    };
    Ok(Target { id, index, fingerprint, shown: shown(&url), url, mask, headers })
}

/// `scheme://host[:port]/path`: no user info, query or fragment.
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

impl Webhooks {
    /// Checks the settings ([`validate`]), connects to the queue's broker (an unreachable one
    /// is a [`ConfigError`], as for the adapter) and starts the batcher, and on a broker the
    /// journal, the consumer and the depth task ([`durable`]). `node` names this node's
    /// consumer on the broker.
    pub async fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        apps: Arc<AppManager>,
        node: &str,
    ) -> Result<Arc<Self>, ConfigError> {
        validate(config)?;
        let queue = match durable::Queue::connect(config, node).await {
            Ok(q) => q,
            // Not asked for, only implied by the adapter: a broker that cannot hold the queue
            // (a NATS without JetStream, a Redis without streams) keeps webhooks in memory.
            Err(e) if config.webhooks.queue_driver.is_none() => {
                tracing::warn!(
                    error = %e,
                    "the adapter's broker cannot hold the webhook queue; webhooks wait in memory \
                     (set webhooks.queue_driver to require the broker)"
                );
                None
            }
            Err(e) => return Err(e),
        };
        let (durable, journal_rx) = match queue {
            Some(queue) => {
                let (d, rx) = durable::Durable::new(queue, config);
                (Some(d), Some(rx))
            }
            None => (None, None),
        };
        let w = &config.webhooks;
        let timeout = Duration::from_millis(w.timeout_ms);
        let mut client = reqwest::Client::builder();
        for root in private_roots(&w.ca_path)? {
            client = client.add_root_certificate(root);
        }
        let client = client
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sockudo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::new("webhooks", format!("cannot build the HTTP client: {e}")))?;
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            client,
            workers: Semaphore::new(w.workers),
            metrics,
            pending: AtomicUsize::new(0),
            max_retry: Duration::from_secs(w.max_retry_seconds),
            phase: phase_rx,
            tasks: Tracker::default(),
            durable: durable.clone(),
        });
        let (tx, rx) = mpsc::channel(w.queue_size);
        let batcher = tokio::spawn(batch(rx, shared.clone(), Duration::from_millis(w.batch_ms)));
        let (journal_closing, closing_rx) = watch::channel(false);
        let journal = match (&durable, journal_rx) {
            (Some(d), Some(rx)) => Some(tokio::spawn(durable::journal(rx, d.clone(), shared.clone(), closing_rx))),
            _ => None,
        };
        let webhooks = Arc::new(Self {
            apps,
            hooks: RwLock::default(),
            next_target: AtomicUsize::new(0),
            tx,
            shared,
            queue_size: w.queue_size,
            app_events: w.max_queue_events_per_app,
            app_bytes: w.max_queue_kb_per_app.saturating_mul(1024),
            app_in_flight: w.max_in_flight_per_app.min(w.workers),
            accepting: AtomicBool::new(true),
            phase: phase_tx,
            batcher: Mutex::new(Some(batcher)),
            journal: Mutex::new(journal),
            journal_closing,
            dropped: AtomicU64::new(0),
        });
        let shared_durable = durable.is_some();
        if let Some(d) = durable {
            // Both end when shutdown begins (the phase changes).
            tokio::spawn(durable::consume(webhooks.clone(), d.clone()));
            tokio::spawn(durable::depth(webhooks.clone(), d));
        }
        let kind = if shared_durable { w.queue(config.adapter.driver).as_str() } else { "memory" };
        tracing::info!(queue = kind, "webhook queue ready");
        Ok(webhooks)
    }

    /// Whether the queue can take events to its broker (always, in memory): readiness.
    pub fn queue_available(&self) -> bool {
        self.shared.durable.as_ref().is_none_or(|d| d.available())
    }

    /// The compiled webhooks of `app`; `None` when it has none.
    fn hooks(&self, app: &Arc<App>) -> Option<Arc<AppHooks>> {
        if app.settings.webhooks.is_empty() {
            return None;
        }
        let cached = self.hooks.read().unwrap_or_else(|p| p.into_inner()).get(&app.id).cloned();
        if let Some(h) = cached.filter(|h| std::ptr::eq(h.app.as_ptr(), Arc::as_ptr(app))) {
            return Some(h);
        }
        let (mut mask, mut targets) = (0, Vec::new());
        for (j, hook) in app.settings.webhooks.iter().enumerate() {
            match compile(hook, self.next_target.fetch_add(1, Ordering::Relaxed), j) {
                Ok(t) => {
                    mask |= t.mask;
                    targets.push(Arc::new(t));
                }
                // Only apps from a database get here: the config file's are checked at startup.
                Err((field, message)) => tracing::warn!(
                    app_id = %app.id,
                    key = %format_args!("webhooks[{j}].{field}"),
                    message,
                    "invalid webhook ignored"
                ),
            }
        }
        let mut apps = self.hooks.write().unwrap_or_else(|p| p.into_inner());
        let share = match apps.get(&app.id) {
            Some(old) => old.share.clone(),
            None => Arc::new(Share::new(self.app_in_flight)),
        };
        let hooks = Arc::new(AppHooks { app: Arc::downgrade(app), mask, targets, share });
        apps.insert(app.id.clone(), hooks.clone());
        Some(hooks)
    }

    /// Whether some webhook of `app` wants events of `kind` (lets callers skip building them).
    pub fn wants(&self, app: &Arc<App>, kind: EventKind) -> bool {
        self.hooks(app).is_some_and(|h| h.mask & kind.bit() != 0)
    }

    /// Queues `event` for every webhook of `app` that wants it, with the current span's
    /// `traceparent`. Never blocks: when the queue or the app's share of it is full the event
    /// is dropped and counted.
    pub fn emit(&self, app: &Arc<App>, event: WebhookEvent) {
        let Some(hooks) = self.hooks(app) else { return };
        let bit = event.kind().bit();
        if hooks.mask & bit == 0 {
            return;
        }
        let json: Arc<str> = Arc::from(event.to_json());
        // Its share of a request body: the event and a comma.
        let bytes = json.len() + 1;
        let traceparent = crate::telemetry::trace::current_traceparent().map(Arc::<str>::from);
        let baggage = crate::telemetry::trace::current_baggage().map(Arc::<str>::from);
        for target in hooks.targets.iter().filter(|t| t.mask & bit != 0) {
            let held = match self.admit(&hooks.share, app, bytes) {
                Ok(held) => held,
                Err(why) => {
                    self.drop_one(app, why);
                    continue;
                }
            };
            let queued = Queued {
                target: target.clone(),
                event: json.clone(),
                traceparent: traceparent.clone(),
                baggage: baggage.clone(),
                held,
            };
            if self.tx.try_send(queued).is_err() {
                // Only when the batcher has stopped (the channel holds at most `queue_size`);
                // the returned event gives its places back as it drops.
                self.drop_one(app, "closed");
            }
        }
    }

    /// Takes a place for one event of `bytes` under the app's share and then under
    /// `queue_size`; the [`Held`] gives both back when the event is delivered or given up.
    fn admit(&self, share: &Arc<Share>, app: &Arc<App>, bytes: usize) -> Result<Held, &'static str> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err("closed");
        }
        if !share.take(bytes, self.app_events, self.app_bytes) {
            return Err("app_share_full");
        }
        let node = self
            .shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.queue_size).then_some(n + 1));
        if node.is_err() {
            share.give_back(1, bytes);
            return Err("queue_full");
        }
        self.shared.metrics.webhooks_queued(&app.attrs, 1);
        Ok(Held { shared: self.shared.clone(), share: share.clone(), app: app.clone(), events: 1, bytes })
    }

    fn drop_one(&self, app: &App, why: &'static str) {
        self.shared.metrics.webhook(&app.attrs, WebhookOutcome::Dropped);
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(app_id = %app.id, reason = why, dropped = n, "webhook events dropped");
        }
    }

    /// Stops accepting events, flushes what is queued and waits for deliveries until
    /// `deadline`; whatever is still pending then is given up.
    pub async fn close(&self, deadline: Instant) {
        self.accepting.store(false, Ordering::Release);
        self.phase.send_replace(Phase::Draining);
        let batcher = self.batcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        let shared = &self.shared;
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner()).take();
        let flushed = tokio::time::timeout_at(deadline, async {
            if let Some(b) = batcher {
                let _ = b.await;
            }
            // Everything batched is with the journal now: it ends once the broker has it.
            self.journal_closing.send_replace(true);
            if let Some(j) = journal {
                let _ = j.await;
            }
            shared.tasks.wait_idle().await;
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(
                pending = shared.pending.load(Ordering::Acquire),
                "webhook deliveries still pending at the shutdown deadline; giving them up"
            );
            self.phase.send_replace(Phase::Abort);
            // Aborted tasks only count themselves and return.
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.wait_idle()).await;
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A request's permits: its app's first, then a worker. An app with `max_in_flight_per_app`
/// requests out waits on its own semaphore holding no worker, so the workers' (first come,
/// first served) queue holds at most that many requests of each app: a freed worker goes to the
/// app that has waited longest, apps take turns, and none waits behind another's backlog.
/// `None` only if a semaphore were closed, which none is.
pub(crate) async fn permits<'a>(
    workers: &'a Semaphore,
    app: &'a Semaphore,
) -> Option<(SemaphorePermit<'a>, SemaphorePermit<'a>)> {
    let own = app.acquire().await.ok()?;
    let worker = workers.acquire().await.ok()?;
    Some((own, worker))
}

/// Events of one app and target waiting for their window to end.
struct Batch {
    target: Arc<Target>,
    events: Vec<Arc<str>>,
    /// The first traced event's context: the request continues that trace, with its baggage.
    traceparent: Option<Arc<str>>,
    baggage: Option<Arc<str>>,
    due: Instant,
    /// The events' places; `held.bytes` is the body's size, roughly.
    held: Held,
}

/// Groups queued events by target for `window`, then hands each batch to a delivery task.
async fn batch(mut rx: mpsc::Receiver<Queued>, shared: Arc<Shared>, window: Duration) {
    let mut batches: HashMap<usize, Batch> = HashMap::new();
    let mut phase = shared.phase.clone();
    loop {
        let next_due = batches.values().map(|b| b.due).min();
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() != Phase::Running {
                    break;
                }
            }
            q = rx.recv() => match q {
                Some(q) => add(&mut batches, q, window, &shared),
                None => break,
            },
            () = sleep_until_opt(next_due) => {
                let now = Instant::now();
                let due: Vec<usize> = batches.iter().filter(|(_, b)| b.due <= now).map(|(k, _)| *k).collect();
                for k in due {
                    if let Some(b) = batches.remove(&k) {
                        flush(b, &shared);
                    }
                }
            }
        }
    }
    // Shutting down: everything already queued goes out now.
    while let Ok(q) = rx.try_recv() {
        add(&mut batches, q, Duration::ZERO, &shared);
    }
    for (_, b) in batches.drain() {
        flush(b, &shared);
    }
}

fn add(batches: &mut HashMap<usize, Batch>, q: Queued, window: Duration, shared: &Arc<Shared>) {
    let id = q.target.id;
    let b = match batches.entry(id) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let b = e.into_mut();
            b.held.merge(q.held);
            b.events.push(q.event);
            if b.traceparent.is_none() && b.baggage.is_none() {
                (b.traceparent, b.baggage) = (q.traceparent, q.baggage);
            }
            b
        }
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Batch {
            target: q.target,
            events: vec![q.event],
            traceparent: q.traceparent,
            baggage: q.baggage,
            due: Instant::now() + window,
            held: q.held,
        }),
    };
    if b.events.len() >= MAX_BATCH_EVENTS || b.held.bytes >= MAX_BATCH_BYTES {
        if let Some(full) = batches.remove(&id) {
            flush(full, shared);
        }
    }
}

/// Serialises and signs the batch once (retries resend the same bytes) and starts its delivery.
fn flush(b: Batch, shared: &Arc<Shared>) {
    let shared = shared.clone();
    let mut body = String::with_capacity(b.held.bytes + 32);
    body.push_str("{\"time_ms\":");
    body.push_str(&unix_millis().to_string());
    body.push_str(",\"events\":[");
    for (i, e) in b.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(e);
    }
    body.push_str("]}");
    let id: Arc<str> = Arc::from(format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
    if let Some(queue) = &shared.durable {
        let entry = durable::Entry {
            id,
            app: b.held.app.id.clone(),
            target: b.target.index,
            fingerprint: b.target.fingerprint.clone(),
            events: b.held.events,
            bytes: b.held.bytes,
            traceparent: b.traceparent,
            baggage: b.baggage,
            body: bytes::Bytes::from(body),
        };
        // Never full: the channel holds `queue_size` requests, and every request holds at
        // least one of the node's `queue_size` places until the journal is done with it.
        let _ = queue.journal.try_send(durable::Pending { entry, held: b.held });
        return;
    }
    let signature = crate::auth::sign(b.held.app.secret(), &body);
    let job = sender::Job {
        id,
        durable: false,
        target: b.target,
        body: bytes::Bytes::from(body),
        signature,
        traceparent: b.traceparent,
        baggage: b.baggage,
        held: b.held,
    };
    let token = shared.tasks.token();
    tokio::spawn(async move {
        sender::deliver(shared, job, token).await;
    });
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppConfig;

    fn config(hooks: Vec<WebhookConfig>) -> Config {
        let mut c = Config::default();
        c.app_manager.array.apps = vec![AppConfig { id: "a".into(), webhooks: hooks, ..AppConfig::default() }];
        c
    }

    fn hook(url: &str, types: &[&str]) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            event_types: types.iter().map(|s| s.to_string()).collect(),
            headers: Default::default(),
        }
    }

    #[test]
    fn bad_webhooks_name_their_key_without_the_url() {
        let err = validate(&config(vec![hook("ftp://user:hunter2@x/", &[])])).unwrap_err();
        assert_eq!(err.key, "app_manager.array.apps[0].webhooks[0].url");
        assert!(!err.message.contains("hunter2"));
        let err = validate(&config(vec![hook("http://x/", &[]), hook("http://x/", &["nope"])])).unwrap_err();
        assert_eq!(err.key, "app_manager.array.apps[0].webhooks[1].event_types");
        let mut bad_header = hook("http://x/", &[]);
        bad_header.headers.insert("bad name".into(), "v".into());
        assert_eq!(
            validate(&config(vec![bad_header])).unwrap_err().key,
            "app_manager.array.apps[0].webhooks[0].headers"
        );
        let mut reserved = hook("http://x/", &[]);
        reserved.headers.insert("X-Pusher-Signature".into(), "forged".into());
        assert!(validate(&config(vec![reserved])).unwrap_err().message.contains("set by the server"));
        let mut c = config(vec![]);
        c.webhooks.workers = 0;
        assert_eq!(validate(&c).unwrap_err().key, "webhooks.workers");
        c.webhooks.workers = 4;
        c.webhooks.max_queue_kb_per_app = 0;
        assert_eq!(validate(&c).unwrap_err().key, "webhooks.max_queue_kb_per_app");
    }

    #[test]
    fn filters_and_shown_urls() {
        let t = compile(&hook("https://u:p@h:8443/path?token=s#f", &["member_added"]), 0, 0).unwrap();
        assert_eq!(t.shown, "https://h:8443/path");
        assert_eq!(t.mask, EventKind::MemberAdded.bit());
        let all = compile(&hook("http://h/", &[]), 1, 0).unwrap();
        assert!(EventKind::ALL.iter().all(|k| all.mask & k.bit() != 0));
    }

    #[tokio::test]
    async fn a_replaced_app_is_compiled_again() {
        use opentelemetry::metrics::MeterProvider as _;
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::default();
        let metrics = Arc::new(Metrics::new(&provider.meter("test"), 0));
        let apps = Arc::new(AppManager::from_config(&Config::default(), &metrics));
        let webhooks = Webhooks::start(&Config::default(), metrics.clone(), apps, "n").await.unwrap();
        let app = |types: &[&str]| {
            let settings =
                AppConfig { id: "a".into(), webhooks: vec![hook("http://h/", types)], ..AppConfig::default() };
            Arc::new(App::new(settings, &metrics))
        };
        let (first, second) = (app(&["member_added"]), app(&["cache_miss"]));
        assert!(webhooks.wants(&first, EventKind::MemberAdded));
        assert!(!webhooks.wants(&second, EventKind::MemberAdded));
        assert!(webhooks.wants(&second, EventKind::CacheMiss));
        let none = Arc::new(App::new(AppConfig { id: "a".into(), ..AppConfig::default() }, &metrics));
        assert!(!webhooks.wants(&none, EventKind::CacheMiss));
        // An invalid webhook from a database is skipped, not fatal.
        let bad = AppConfig { id: "b".into(), webhooks: vec![hook("not a url", &[])], ..AppConfig::default() };
        assert!(!webhooks.wants(&Arc::new(App::new(bad, &metrics)), EventKind::CacheMiss));
    }

    #[test]
    fn a_share_bounds_events_and_bytes() {
        let share = Share::new(1);
        assert!(share.take(10, 3, 25) && share.take(10, 3, 25));
        assert!(!share.take(10, 3, 25), "25 bytes hold two events of 10");
        assert!(share.take(5, 3, 25));
        assert!(!share.take(1, 3, 25), "3 events at most");
        assert_eq!((share.events.load(Ordering::Acquire), share.bytes.load(Ordering::Acquire)), (3, 25));
        share.give_back(3, 25);
        // Alone, an event larger than the byte share still goes; nothing goes beside it.
        assert!(share.take(100, 3, 25));
        assert!(!share.take(1, 3, 25));
        share.give_back(1, 100);
        assert_eq!((share.events.load(Ordering::Acquire), share.bytes.load(Ordering::Acquire)), (0, 0));
    }

    #[tokio::test]
    async fn a_full_app_share_drops_only_that_apps_events() {
        use opentelemetry::metrics::MeterProvider as _;
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::default();
        let metrics = Arc::new(Metrics::new(&provider.meter("test"), 0));
        let mut c = Config::default();
        c.webhooks.queue_size = 5;
        c.webhooks.max_queue_events_per_app = 3;
        let apps = Arc::new(AppManager::from_config(&c, &metrics));
        let webhooks = Webhooks::start(&c, metrics.clone(), apps, "n").await.unwrap();
        let app = |id: &str| {
            let settings = AppConfig { id: id.into(), webhooks: vec![hook("http://h/", &[])], ..AppConfig::default() };
            Arc::new(App::new(settings, &metrics))
        };
        let (a, b) = (app("a"), app("b"));
        let (share_a, share_b) = (webhooks.hooks(&a).unwrap().share.clone(), webhooks.hooks(&b).unwrap().share.clone());
        let mut held_a: Vec<Held> = (0..3).map(|_| webhooks.admit(&share_a, &a, 10).unwrap()).collect();
        assert_eq!(webhooks.admit(&share_a, &a, 10).err(), Some("app_share_full"));
        let held_b: Vec<Held> = (0..2).map(|_| webhooks.admit(&share_b, &b, 10).unwrap()).collect();
        assert_eq!(webhooks.admit(&share_b, &b, 10).err(), Some("queue_full"), "the node's bound still holds");
        assert_eq!(share_b.events.load(Ordering::Acquire), 2, "a refusal by the node gives the app's place back");
        // Delivered or given up, an event's places come back: merged ones too.
        let mut merged = held_a.pop().unwrap();
        merged.merge(held_a.pop().unwrap());
        assert_eq!((merged.events, merged.bytes), (2, 20));
        drop(merged);
        assert_eq!(share_a.events.load(Ordering::Acquire), 1);
        assert_eq!(webhooks.shared.pending.load(Ordering::Acquire), 3);
        assert!(webhooks.admit(&share_a, &a, 10).is_ok());
        // A replaced app keeps its share.
        let a2 = app("a");
        assert!(Arc::ptr_eq(&webhooks.hooks(&a2).unwrap().share, &share_a));
        drop((held_a, held_b));
        assert_eq!(webhooks.shared.pending.load(Ordering::Acquire), 0);
    }

    /// Each app may have one request out; one worker. While app a's receiver hangs, b and c
    /// queue for the worker, and a's second request queues behind its own first, holding no
    /// worker: the worker goes b, c, then a.
    #[tokio::test]
    async fn apps_take_turns_for_the_workers() {
        let workers = Arc::new(Semaphore::new(1));
        let apps: Vec<Arc<Semaphore>> = (0..3).map(|_| Arc::new(Semaphore::new(1))).collect();
        let (got_tx, mut got) = mpsc::unbounded_channel();
        let mut release = Vec::new();
        for (name, app) in [("a1", 0), ("a2", 0), ("b", 1), ("c", 2)] {
            let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
            release.push(done_tx);
            let (workers, app, got_tx) = (workers.clone(), apps[app].clone(), got_tx.clone());
            tokio::spawn(async move {
                let _p = permits(&workers, &app).await;
                got_tx.send(name).unwrap();
                let _ = done.await;
            });
            // Let it reach its place in the semaphores' queues.
            for _ in 0..5 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(got.recv().await, Some("a1"));
        assert!(got.try_recv().is_err(), "a1 holds the worker");
        let mut order = Vec::new();
        let mut release: std::collections::VecDeque<_> = release.into();
        let mut holder = release.pop_front().unwrap();
        let mut rest: HashMap<&str, tokio::sync::oneshot::Sender<()>> =
            ["a2", "b", "c"].into_iter().zip(release).collect();
        for _ in 0..3 {
            let _ = holder.send(());
            let next = got.recv().await.unwrap();
            order.push(next);
            holder = rest.remove(next).unwrap();
        }
        assert_eq!(order, ["b", "c", "a2"]);
    }
}
