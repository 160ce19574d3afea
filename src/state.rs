//! What request handlers and socket tasks share: config, apps, the adapter, metrics, the
//! shutdown signal and node-wide counters. Built once by `server::run`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::adapter::Adapter;
use crate::app::AppManager;
use crate::config::Config;
use crate::rate_limit::RateLimiter;
use crate::shutdown::{Shutdown, Tracker};
use crate::telemetry::Metrics;

pub struct State {
    pub config: Arc<Config>,
    pub apps: Arc<AppManager>,
    pub adapter: Arc<Adapter>,
    pub metrics: Arc<Metrics>,
    /// API and connection-rate limits (per node, or cluster-wide through Redis).
    pub limiter: RateLimiter,
    pub shutdown: Shutdown,
    /// Socket tasks; shutdown waits for them.
    pub sockets: Tracker,
    /// Set when shutdown starts: `/up` answers 503 from then on.
    pub draining: AtomicBool,
    connections: AtomicU64,
    /// Resident memory in bytes, sampled by the server when `max_memory_mb` is set.
    pub rss_bytes: AtomicU64,
    next_socket: AtomicU64,
    node_tag: u32,
}

impl State {
    pub fn new(
        config: Arc<Config>,
        apps: Arc<AppManager>,
        adapter: Arc<Adapter>,
        metrics: Arc<Metrics>,
        limiter: RateLimiter,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            config,
            apps,
            adapter,
            metrics,
            limiter,
            shutdown,
            sockets: Tracker::default(),
            draining: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(0),
            next_socket: AtomicU64::new(1),
            // Random per process so socket ids from different nodes do not collide.
            node_tag: fastrand::u32(1..u32::MAX),
        }
    }

    /// A socket id unique on this node (`random.counter`).
    pub fn next_socket_id(&self) -> Arc<str> {
        let n = self.next_socket.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{}.{}", self.node_tag, n))
    }

    /// Takes a node-wide connection slot under `max_connections`.
    pub fn try_acquire_connection(&self) -> bool {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok()
    }

    /// Whether memory admission control refuses new connections now.
    pub fn over_memory(&self) -> bool {
        let max = self.config.max_memory_mb;
        max > 0 && self.rss_bytes.load(Ordering::Relaxed) > max * 1024 * 1024
    }

    pub fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready for traffic: not draining, connected to the cluster's broker, and the webhook
    /// queue's broker answers.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.adapter.is_connected() && self.adapter.webhook_queue_available()
    }
}
