//! The last events of one app's cache channels, bounded three ways: at most
//! [`MAX_CACHED_CHANNELS`] channels, at most `cache.max_mb_per_app` bytes for the app, and at
//! most `cache.max_mb` bytes for every app on this node together (a counter shared by all apps).
//!
//! An entry weighs its frame's length plus its channel name's length; the map's own overhead is
//! not counted. Entries are kept in insertion order (a `BTreeMap` from a sequence number to the
//! channel), so the oldest is found in O(log n) and eviction never scans the map under the lock.
//! Every entry has the same TTL, so insertion order is also expiry order and expiry pops from the
//! front too.
//!
//! Tenant isolation: a store only ever evicts the writing app's own entries. When the node bound
//! is reached and the writing app has nothing left to evict, the new event is not stored (and
//! counted as an eviction); another app's entries are never touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;

/// Cache channels per app whose last event is kept at once.
pub const MAX_CACHED_CHANNELS: usize = 100_000;

/// How long a last event is kept, and the byte bounds of the app and of the node.
#[derive(Debug, Clone, Copy)]
pub struct CacheBounds {
    pub ttl: Duration,
    pub max_app_bytes: u64,
    pub max_node_bytes: u64,
}

impl CacheBounds {
    /// Only the TTL and the channel count bound this cache (for tests).
    pub fn ttl_only(ttl: Duration) -> Self {
        Self { ttl, max_app_bytes: u64::MAX, max_node_bytes: u64::MAX }
    }
}

/// What one operation did to the app's cache, for the metrics (recorded after the lock).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheChange {
    /// Bytes the app holds now minus before.
    pub bytes_delta: i64,
    /// Unexpired events evicted to make room, plus the new event when it was not stored.
    pub evicted: u64,
}

struct Entry {
    frame: Utf8Bytes,
    expires: Instant,
    seq: u64,
    bytes: u64,
}

#[derive(Default)]
pub(super) struct CacheStore {
    entries: HashMap<Arc<str>, Entry>,
    /// Insertion order: sequence number → channel. Same keys as `entries`, one each.
    order: BTreeMap<u64, Arc<str>>,
    next: u64,
    /// Sum of the entries' `bytes`; also included in the node's shared counter.
    bytes: u64,
}

impl CacheStore {
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn take(&mut self, e: &Entry, node: &AtomicU64) {
        self.order.remove(&e.seq);
        self.bytes -= e.bytes;
        node.fetch_sub(e.bytes, Ordering::Relaxed);
    }

    fn remove(&mut self, channel: &str, node: &AtomicU64) {
        if let Some(e) = self.entries.remove(channel) {
            self.take(&e, node);
        }
    }

    /// Removes the oldest entry; false when there is none.
    fn pop_oldest(&mut self, node: &AtomicU64) -> bool {
        let Some((_, channel)) = self.order.pop_first() else { return false };
        self.remove(&channel, node);
        true
    }

    /// Drops expired entries, oldest first, stopping at the first one still alive.
    fn expire(&mut self, now: Instant, node: &AtomicU64) {
        while let Some((&seq, channel)) = self.order.first_key_value() {
            match self.entries.get(channel) {
                Some(e) if e.expires > now => break,
                Some(_) => {
                    let channel = channel.clone();
                    self.remove(&channel, node);
                }
                None => {
                    self.order.remove(&seq);
                }
            }
        }
    }

    /// Stores `frame` as `channel`'s last event, evicting this app's oldest events until it fits
    /// under the count, the app's and the node's bounds.
    pub(super) fn set(
        &mut self,
        channel: &str,
        frame: Utf8Bytes,
        now: Instant,
        b: &CacheBounds,
        node: &AtomicU64,
    ) -> CacheChange {
        let before = self.bytes;
        let mut evicted = 0;
        let size = frame.len() as u64 + channel.len() as u64;
        // The replaced event goes first: its bytes are free again, and if the new event cannot
        // be stored a subscriber must get `pusher:cache_miss`, never the event it replaced.
        self.remove(channel, node);
        self.expire(now, node);
        if size > b.max_app_bytes {
            evicted += 1;
        } else {
            loop {
                let fits_app = self.bytes + size <= b.max_app_bytes && self.entries.len() < MAX_CACHED_CHANNELS;
                // Reserve the node's bytes atomically, so that two apps storing at once cannot
                // both pass the node bound.
                let reserved = fits_app
                    && node
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                            t.checked_add(size).filter(|n| *n <= b.max_node_bytes)
                        })
                        .is_ok();
                if reserved {
                    let seq = self.next;
                    self.next += 1;
                    let name: Arc<str> = Arc::from(channel);
                    self.order.insert(seq, name.clone());
                    self.entries.insert(name, Entry { frame, expires: now + b.ttl, seq, bytes: size });
                    self.bytes += size;
                    break;
                }
                evicted += 1;
                // With nothing of its own left, the node is full of other apps' events, which
                // this app may not evict: the new event is not stored (counted above).
                if !self.pop_oldest(node) {
                    break;
                }
            }
        }
        CacheChange { bytes_delta: delta(before, self.bytes), evicted }
    }

    /// The channel's last event if it has not expired; an expired one is dropped.
    pub(super) fn get(&mut self, channel: &str, now: Instant, node: &AtomicU64) -> (Option<Utf8Bytes>, CacheChange) {
        let before = self.bytes;
        let frame = match self.entries.get(channel) {
            Some(e) if e.expires > now => Some(e.frame.clone()),
            Some(_) => {
                self.remove(channel, node);
                None
            }
            None => None,
        };
        (frame, CacheChange { bytes_delta: delta(before, self.bytes), evicted: 0 })
    }

    /// Drops every expired entry.
    pub(super) fn sweep(&mut self, now: Instant, node: &AtomicU64) -> CacheChange {
        let before = self.bytes;
        self.expire(now, node);
        CacheChange { bytes_delta: delta(before, self.bytes), evicted: 0 }
    }

    /// Gives every byte back to the node (the app's state is going away).
    pub(super) fn release(&mut self, node: &AtomicU64) {
        node.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.entries.clear();
        self.order.clear();
    }
}

fn delta(before: u64, after: u64) -> i64 {
    // Both are at most the app's bound, which config validation keeps far below i64::MAX.
    after as i64 - before as i64
}
