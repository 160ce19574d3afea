//! Webhooks: tells each app's backend about channel, presence, client and cache events with
//! signed HTTP POSTs in Pusher's format (`{"time_ms": ..., "events": [...]}`).
//!
//! [`Webhooks::emit`] is called by the adapter on socket and API paths, so it is synchronous and
//! never waits: it filters by each URL's `event_types` and `try_send`s into one bounded queue.
//! Beyond `webhooks.queue_size` events (queued, batching, in flight or waiting to be retried)
//! new events are dropped and counted (`webhooks_total{outcome="dropped"}`). One batcher task
//! groups events by app and URL for `batch_ms` and hands each batch to a delivery task
//! ([`sender`]); at most `workers` requests are in flight, and a batch waiting for its next
//! retry holds no worker. On shutdown the queue stops accepting, the batcher flushes
//! everything, retries still waiting are tried once more, and whatever has not finished by the
//! deadline is given up (counted `failed`).
//!
//! The config file's webhooks are checked at startup ([`validate`], exit 64 on error); each
//! app's webhooks are compiled on first use and again when the app is replaced (apps from a
//! database change at run time), and an invalid one from a database is logged and skipped.

mod event;
mod sender;

pub use event::{EventKind, WebhookEvent};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::App;
use crate::config::{Config, ConfigError, WebhookConfig};
use crate::shutdown::Tracker;
use crate::telemetry::{Metrics, WebhookOutcome};

/// Events in one request at most; a fuller batch is sent before its window ends.
const MAX_BATCH_EVENTS: usize = 100;
/// Body bytes of one request, roughly, at most (one event larger than this still goes alone).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Headers every request gets from the server; a webhook's `headers` may not set them.
const RESERVED_HEADERS: [&str; 4] = ["content-type", "x-pusher-key", "x-pusher-signature", "traceparent"];

/// One webhook URL of an app, checked and parsed once per `App`.
pub(crate) struct Target {
    /// Index among all targets: the batcher's grouping key.
    id: usize,
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
}

/// An event on its way to one target.
struct Queued {
    app: Arc<App>,
    target: Arc<Target>,
    event: Arc<str>,
    traceparent: Option<Arc<str>>,
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
struct Shared {
    client: reqwest::Client,
    /// One per concurrent request (`webhooks.workers`).
    workers: Semaphore,
    metrics: Arc<Metrics>,
    /// Events accepted and not yet delivered or given up, for the `queue_size` bound.
    pending: AtomicUsize,
    max_retry: Duration,
    phase: watch::Receiver<Phase>,
    /// Live delivery tasks; shutdown waits for them.
    tasks: Tracker,
}

/// The webhook queue and its senders.
pub struct Webhooks {
    /// Compiled targets by app id, filled on first use. Read-locked for a lookup only (an app
    /// without webhooks never gets here); written when an app is first seen or has changed.
    apps: RwLock<HashMap<String, Arc<AppHooks>>>,
    next_target: AtomicUsize,
    tx: mpsc::Sender<Queued>,
    shared: Arc<Shared>,
    queue_size: usize,
    accepting: AtomicBool,
    phase: watch::Sender<Phase>,
    batcher: Mutex<Option<JoinHandle<()>>>,
    /// Events dropped, for sparse logging (the metric counts every one).
    dropped: AtomicU64,
}

/// Checks the `webhooks` settings and the webhooks of the config file's apps; the error names
/// the key at fault. Messages never repeat a URL or a header value (either may hold a
/// credential). Apps from a database are checked when first used instead (see [`Webhooks`]).
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let w = &config.webhooks;
    for (key, value) in [("webhooks.queue_size", w.queue_size as u64), ("webhooks.workers", w.workers as u64)] {
        if value == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    if w.timeout_ms == 0 {
        return Err(ConfigError::new("webhooks.timeout_ms", "must be at least 1"));
    }
    if config.app_manager.driver == "config" {
        for (i, app) in config.app_manager.array.apps.iter().enumerate() {
            for (j, hook) in app.webhooks.iter().enumerate() {
                compile(hook, 0).map_err(|(field, message)| {
                    ConfigError::new(format!("app_manager.array.apps[{i}].webhooks[{j}].{field}"), message)
                })?;
            }
        }
    }
    Ok(())
}

/// One webhook's target, or the field at fault and why.
fn compile(hook: &WebhookConfig, id: usize) -> Result<Target, (&'static str, String)> {
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
    Ok(Target { id, shown: shown(&url), url, mask, headers })
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
    /// Checks the settings ([`validate`]) and starts the batcher. Must run inside the Tokio
    /// runtime.
    pub fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ConfigError> {
        validate(config)?;
        let w = &config.webhooks;
        let timeout = Duration::from_millis(w.timeout_ms);
        let client = reqwest::Client::builder()
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
        });
        let (tx, rx) = mpsc::channel(w.queue_size);
        let batcher = tokio::spawn(batch(rx, shared.clone(), Duration::from_millis(w.batch_ms)));
        Ok(Arc::new(Self {
            apps: RwLock::default(),
            next_target: AtomicUsize::new(0),
            tx,
            shared,
            queue_size: w.queue_size,
            accepting: AtomicBool::new(true),
            phase: phase_tx,
            batcher: Mutex::new(Some(batcher)),
            dropped: AtomicU64::new(0),
        }))
    }

    /// The compiled webhooks of `app`; `None` when it has none.
    fn hooks(&self, app: &Arc<App>) -> Option<Arc<AppHooks>> {
        if app.settings.webhooks.is_empty() {
            return None;
        }
        let cached = self.apps.read().unwrap_or_else(|p| p.into_inner()).get(&app.id).cloned();
        if let Some(h) = cached.filter(|h| std::ptr::eq(h.app.as_ptr(), Arc::as_ptr(app))) {
            return Some(h);
        }
        let mut hooks = AppHooks { app: Arc::downgrade(app), mask: 0, targets: Vec::new() };
        for (j, hook) in app.settings.webhooks.iter().enumerate() {
            match compile(hook, self.next_target.fetch_add(1, Ordering::Relaxed)) {
                Ok(t) => {
                    hooks.mask |= t.mask;
                    hooks.targets.push(Arc::new(t));
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
        let hooks = Arc::new(hooks);
        self.apps.write().unwrap_or_else(|p| p.into_inner()).insert(app.id.clone(), hooks.clone());
        Some(hooks)
    }

    /// Whether some webhook of `app` wants events of `kind` (lets callers skip building them).
    pub fn wants(&self, app: &Arc<App>, kind: EventKind) -> bool {
        self.hooks(app).is_some_and(|h| h.mask & kind.bit() != 0)
    }

    /// Queues `event` for every webhook of `app` that wants it, with the current span's
    /// `traceparent`. Never blocks: when the queue is full the event is dropped and counted.
    pub fn emit(&self, app: &Arc<App>, event: WebhookEvent) {
        let Some(hooks) = self.hooks(app) else { return };
        let bit = event.kind().bit();
        if hooks.mask & bit == 0 {
            return;
        }
        let json: Arc<str> = Arc::from(event.to_json());
        let traceparent = crate::telemetry::trace::current_traceparent().map(Arc::<str>::from);
        for target in hooks.targets.iter().filter(|t| t.mask & bit != 0) {
            let queued = Queued {
                app: app.clone(),
                target: target.clone(),
                event: json.clone(),
                traceparent: traceparent.clone(),
            };
            if !self.admit() {
                self.drop_one(app);
            } else if self.tx.try_send(queued).is_err() {
                // Only when the batcher has stopped: the channel holds at most `queue_size`.
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                self.drop_one(app);
            }
        }
    }

    /// Takes a place under `queue_size` (released when the event is delivered or given up).
    fn admit(&self) -> bool {
        if !self.accepting.load(Ordering::Acquire) {
            return false;
        }
        self.shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.queue_size).then_some(n + 1))
            .is_ok()
    }

    fn drop_one(&self, app: &App) {
        self.shared.metrics.webhook(&app.attrs, WebhookOutcome::Dropped);
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(app_id = %app.id, dropped = n, "webhook queue full or closed; events dropped");
        }
    }

    /// Stops accepting events, flushes what is queued and waits for deliveries until
    /// `deadline`; whatever is still pending then is given up.
    pub async fn close(&self, deadline: Instant) {
        self.accepting.store(false, Ordering::Release);
        self.phase.send_replace(Phase::Draining);
        let batcher = self.batcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        let shared = &self.shared;
        let flushed = tokio::time::timeout_at(deadline, async {
            if let Some(b) = batcher {
                let _ = b.await;
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

/// Events of one app and target waiting for their window to end.
struct Batch {
    app: Arc<App>,
    target: Arc<Target>,
    events: Vec<Arc<str>>,
    bytes: usize,
    /// The first traced event's context: the request continues that trace.
    traceparent: Option<Arc<str>>,
    due: Instant,
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
    let b = batches.entry(q.target.id).or_insert_with(|| Batch {
        app: q.app.clone(),
        target: q.target.clone(),
        events: Vec::new(),
        bytes: 0,
        traceparent: None,
        due: Instant::now() + window,
    });
    b.bytes += q.event.len() + 1;
    b.events.push(q.event);
    if b.traceparent.is_none() {
        b.traceparent = q.traceparent;
    }
    if b.events.len() >= MAX_BATCH_EVENTS || b.bytes >= MAX_BATCH_BYTES {
        if let Some(full) = batches.remove(&q.target.id) {
            flush(full, shared);
        }
    }
}

/// Serialises and signs the batch once (retries resend the same bytes) and starts its delivery.
fn flush(b: Batch, shared: &Arc<Shared>) {
    let mut body = String::with_capacity(b.bytes + 32);
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
    let signature = crate::auth::sign(b.app.secret(), &body);
    let job = sender::Job {
        app: b.app,
        target: b.target,
        body: bytes::Bytes::from(body),
        signature,
        events: b.events.len(),
        traceparent: b.traceparent,
    };
    let token = shared.tasks.token();
    tokio::spawn(sender::deliver(shared.clone(), job, token));
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
    }

    #[test]
    fn filters_and_shown_urls() {
        let t = compile(&hook("https://u:p@h:8443/path?token=s#f", &["member_added"]), 0).unwrap();
        assert_eq!(t.shown, "https://h:8443/path");
        assert_eq!(t.mask, EventKind::MemberAdded.bit());
        let all = compile(&hook("http://h/", &[]), 1).unwrap();
        assert!(EventKind::ALL.iter().all(|k| all.mask & k.bit() != 0));
    }

    #[tokio::test]
    async fn a_replaced_app_is_compiled_again() {
        use opentelemetry::metrics::MeterProvider as _;
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::default();
        let metrics = Arc::new(Metrics::new(&provider.meter("test"), 0));
        let webhooks = Webhooks::start(&Config::default(), metrics.clone()).unwrap();
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
}
