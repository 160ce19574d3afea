//! This node's channel state per app: subscribers, presence members, cached last events and
//! signed-in users. Everything here is synchronous and guarded by one short-lived mutex per app;
//! no lock is held across an `.await`, and broadcasts take a shared snapshot of the subscriber
//! list so that fan-out happens outside the lock.

mod cache;
mod socket;

pub use cache::{CacheBounds, CacheChange, MAX_CACHED_CHANNELS};
pub use socket::{Delivery, Frame, SocketHandle, SocketId};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;

use crate::app::App;
use crate::protocol::{ChannelName, ChannelType, PresenceMember};
use crate::telemetry::CacheMeter;
use cache::CacheStore;

/// The subscribers of a channel at one moment, shared by every broadcast until it changes.
pub type Snapshot = Arc<[Arc<SocketHandle>]>;

/// Why a subscription was refused by channel state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeError {
    /// The presence channel already has its maximum number of members.
    PresenceFull(usize),
}

/// What a subscription changed.
#[derive(Debug)]
pub struct Subscribed {
    /// The channel had no subscriber on this node before.
    pub occupied: bool,
    /// The socket was already subscribed; nothing changed.
    pub already: bool,
    /// The user joined the presence channel (first socket of that user).
    pub member_added: bool,
    /// `{"presence":{...}}` for presence channels, else `{}`.
    pub succeeded_data: String,
    pub subscription_count: usize,
}

/// What an unsubscription changed.
#[derive(Debug)]
pub struct Unsubscribed {
    pub channel_type: ChannelType,
    /// The last subscriber on this node left.
    pub vacated: bool,
    /// The user left the presence channel (its last socket).
    pub member_removed: Option<Arc<str>>,
    pub subscription_count: usize,
    pub presence: bool,
}

/// Counts of one channel.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    pub name: Arc<str>,
    pub channel_type: ChannelType,
    pub presence: bool,
    pub subscription_count: usize,
    pub user_count: usize,
}

struct Sub {
    handle: Arc<SocketHandle>,
    user_id: Option<Arc<str>>,
}

struct Member {
    info: Box<RawValue>,
    sockets: u32,
}

struct Channel {
    name: ChannelName,
    subs: HashMap<SocketId, Sub>,
    snapshot: Option<Snapshot>,
    members: HashMap<Arc<str>, Member>,
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, Channel>,
    cache: CacheStore,
    users: SocketsByUser,
    /// Signed-in sockets by the users they watch (at most `max_watchlist_size` entries each).
    watchers: SocketsByUser,
}

/// The channel state of one app on this node.
pub struct AppChannels {
    inner: Mutex<Inner>,
    cache: CacheBounds,
    /// Bytes of every app's cached events on this node, shared with the [`Registry`].
    node_bytes: Arc<AtomicU64>,
    meter: Option<CacheMeter>,
}

impl AppChannels {
    /// State whose cache is bounded only by `cache_ttl` and the channel count (for tests).
    pub fn new(cache_ttl: Duration) -> Self {
        Self::with_cache(CacheBounds::ttl_only(cache_ttl), Arc::default(), None)
    }

    /// State whose cache counts its bytes in `node_bytes` too and reports them to `meter`.
    pub fn with_cache(cache: CacheBounds, node_bytes: Arc<AtomicU64>, meter: Option<CacheMeter>) -> Self {
        Self { inner: Mutex::new(Inner::default()), cache, node_bytes, meter }
    }

    /// Records a cache change, called after the lock is released.
    fn record(&self, change: CacheChange) -> CacheChange {
        if let Some(m) = &self.meter {
            m.record(change.bytes_delta, change.evicted);
        }
        change
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections only move map entries; a panic inside one cannot leave a
        // half-updated invariant that later code relies on, so a poisoned lock stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `handle` to `channel` (as `member` on presence channels).
    pub fn subscribe(
        &self,
        channel: &ChannelName,
        handle: &Arc<SocketHandle>,
        member: Option<PresenceMember>,
        max_members: usize,
    ) -> Result<Subscribed, SubscribeError> {
        let mut inner = self.lock();
        let occupied = !inner.channels.contains_key(channel.as_str());
        let ch = inner.channels.entry(Arc::from(channel.as_str())).or_insert_with(|| Channel {
            name: channel.clone(),
            subs: HashMap::new(),
            snapshot: None,
            members: HashMap::new(),
        });
        if ch.subs.contains_key(&handle.id) {
            let succeeded_data = presence_payload(ch);
            return Ok(Subscribed {
                occupied: false,
                already: true,
                member_added: false,
                succeeded_data,
                subscription_count: ch.subs.len(),
            });
        }
        let mut member_added = false;
        let user_id = match member {
            Some(m) => {
                let user_id: Arc<str> = Arc::from(m.user_id);
                match ch.members.get_mut(&user_id) {
                    Some(existing) => existing.sockets += 1,
                    None => {
                        if ch.members.len() >= max_members {
                            if ch.subs.is_empty() {
                                inner.channels.remove(channel.as_str());
                            }
                            return Err(SubscribeError::PresenceFull(max_members));
                        }
                        ch.members.insert(user_id.clone(), Member { info: m.user_info, sockets: 1 });
                        member_added = true;
                    }
                }
                Some(user_id)
            }
            None => None,
        };
        ch.subs.insert(handle.id.clone(), Sub { handle: handle.clone(), user_id });
        ch.snapshot = None;
        Ok(Subscribed {
            occupied,
            already: false,
            member_added,
            succeeded_data: presence_payload(ch),
            subscription_count: ch.subs.len(),
        })
    }

    /// Removes a socket from a channel; `None` when it was not subscribed.
    pub fn unsubscribe(&self, channel: &str, socket_id: &str) -> Option<Unsubscribed> {
        let mut inner = self.lock();
        let ch = inner.channels.get_mut(channel)?;
        let sub = ch.subs.remove(socket_id)?;
        ch.snapshot = None;
        let mut member_removed = None;
        if let Some(user_id) = sub.user_id {
            if let Some(m) = ch.members.get_mut(&user_id) {
                m.sockets -= 1;
                if m.sockets == 0 {
                    ch.members.remove(&user_id);
                    member_removed = Some(user_id);
                }
            }
        }
        let out = Unsubscribed {
            channel_type: ch.name.channel_type(),
            vacated: ch.subs.is_empty(),
            member_removed,
            subscription_count: ch.subs.len(),
            presence: ch.name.kind() == crate::protocol::ChannelKind::Presence,
        };
        if out.vacated {
            inner.channels.remove(channel);
        }
        Some(out)
    }

    /// The current subscribers of `channel`, shared until the next change.
    pub fn snapshot(&self, channel: &str) -> Option<Snapshot> {
        let mut inner = self.lock();
        let ch = inner.channels.get_mut(channel)?;
        Some(
            ch.snapshot
                .get_or_insert_with(|| ch.subs.values().map(|s| s.handle.clone()).collect::<Vec<_>>().into())
                .clone(),
        )
    }

    /// Keeps `frame` as the channel's last event (cache channels), evicting this app's oldest
    /// stored events while it would pass the channel count, the app's byte bound or the node's
    /// (see `cache.rs`: never another app's events; an event that cannot fit is not stored).
    pub fn set_cache(&self, channel: &str, frame: Utf8Bytes) -> CacheChange {
        let change = self.lock().cache.set(channel, frame, Instant::now(), &self.cache, &self.node_bytes);
        self.record(change)
    }

    /// The channel's last event, if it has one that has not expired.
    pub fn cached(&self, channel: &str) -> Option<Utf8Bytes> {
        let (frame, change) = self.lock().cache.get(channel, Instant::now(), &self.node_bytes);
        self.record(change);
        frame
    }

    /// Drops expired cache entries; returns how many remain.
    pub fn sweep_cache(&self) -> usize {
        let (change, left) = {
            let mut inner = self.lock();
            (inner.cache.sweep(Instant::now(), &self.node_bytes), inner.cache.len())
        };
        self.record(change);
        left
    }

    /// Bytes of this app's cached events (frame plus channel name each).
    pub fn cache_bytes(&self) -> u64 {
        self.lock().cache.bytes()
    }

    /// Counts of one channel (zeros when nobody is subscribed here).
    pub fn info(&self, channel: &ChannelName) -> ChannelInfo {
        let inner = self.lock();
        let (subs, users) =
            inner.channels.get(channel.as_str()).map(|c| (c.subs.len(), c.members.len())).unwrap_or((0, 0));
        ChannelInfo {
            name: Arc::from(channel.as_str()),
            channel_type: channel.channel_type(),
            presence: channel.kind() == crate::protocol::ChannelKind::Presence,
            subscription_count: subs,
            user_count: users,
        }
    }

    /// Occupied channels whose name starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<ChannelInfo> {
        let inner = self.lock();
        inner
            .channels
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, c)| ChannelInfo {
                name: name.clone(),
                channel_type: c.name.channel_type(),
                presence: c.name.kind() == crate::protocol::ChannelKind::Presence,
                subscription_count: c.subs.len(),
                user_count: c.members.len(),
            })
            .collect()
    }

    /// The user ids present in a presence channel.
    pub fn members(&self, channel: &str) -> Vec<Arc<str>> {
        let inner = self.lock();
        inner.channels.get(channel).map(|c| c.members.keys().cloned().collect()).unwrap_or_default()
    }

    /// Registers a signed-in socket under its user; true when it is the user's first here.
    pub fn add_user(&self, user_id: &Arc<str>, handle: &Arc<SocketHandle>) -> bool {
        add_socket(&mut self.lock().users, user_id, handle)
    }

    /// Removes a signed-in socket; true when it was the user's last here.
    pub fn remove_user(&self, user_id: &str, socket_id: &str) -> bool {
        remove_socket(&mut self.lock().users, user_id, socket_id)
    }

    /// Whether `user_id` has a signed-in socket on this node.
    pub fn has_user(&self, user_id: &str) -> bool {
        self.lock().users.contains_key(user_id)
    }

    /// Registers `handle` as a watcher of each of `users`.
    pub fn watch(&self, handle: &Arc<SocketHandle>, users: &[Arc<str>]) {
        let mut inner = self.lock();
        for user in users {
            add_socket(&mut inner.watchers, user, handle);
        }
    }

    /// Undoes [`AppChannels::watch`] for the socket `socket_id`.
    pub fn unwatch(&self, socket_id: &str, users: &[Arc<str>]) {
        let mut inner = self.lock();
        for user in users {
            remove_socket(&mut inner.watchers, user, socket_id);
        }
    }

    /// The sockets on this node watching `user_id`.
    pub fn watchers(&self, user_id: &str) -> Vec<Arc<SocketHandle>> {
        self.lock().watchers.get(user_id).map(|s| s.values().cloned().collect()).unwrap_or_default()
    }

    /// The sockets signed in as `user_id` on this node.
    pub fn user_sockets(&self, user_id: &str) -> Vec<Arc<SocketHandle>> {
        let inner = self.lock();
        inner.users.get(user_id).map(|s| s.values().cloned().collect()).unwrap_or_default()
    }

    /// Occupied channels on this node (for tests and gauges).
    pub fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    /// Occupied channels and presence members (one per user per channel) on this node.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.channels.len(), inner.channels.values().map(|c| c.members.len()).sum())
    }
}

impl Drop for AppChannels {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let change = CacheChange { bytes_delta: -(inner.cache.bytes() as i64), evicted: 0 };
        inner.cache.release(&self.node_bytes);
        self.record(change);
    }
}

type SocketsByUser = HashMap<Arc<str>, HashMap<SocketId, Arc<SocketHandle>>>;

/// Adds `handle` under `user`; true when it is the user's first socket there.
fn add_socket(map: &mut SocketsByUser, user: &Arc<str>, handle: &Arc<SocketHandle>) -> bool {
    let sockets = map.entry(user.clone()).or_default();
    let first = sockets.is_empty();
    sockets.insert(handle.id.clone(), handle.clone());
    first
}

/// Removes `socket_id` from under `user` (and the user when it was the last); true then.
fn remove_socket(map: &mut SocketsByUser, user: &str, socket_id: &str) -> bool {
    let Some(sockets) = map.get_mut(user) else { return false };
    if sockets.remove(socket_id).is_none() || !sockets.is_empty() {
        return false;
    }
    map.remove(user);
    true
}

fn presence_payload(ch: &Channel) -> String {
    if ch.name.kind() != crate::protocol::ChannelKind::Presence {
        return "{}".to_owned();
    }
    crate::protocol::server::presence_data(ch.members.iter().map(|(id, m)| (&**id, m.info.get())), ch.members.len())
}

/// Channel state of every app on this node.
pub struct Registry {
    apps: RwLock<HashMap<String, Arc<AppChannels>>>,
    cache: CacheBounds,
    /// Bytes of every app's cached events, for the node bound (`cache.max_mb`).
    node_bytes: Arc<AtomicU64>,
}

impl Registry {
    pub fn new(cache: CacheBounds) -> Self {
        Self { apps: RwLock::default(), cache, node_bytes: Arc::default() }
    }

    /// The state of `app`, created on first use with the app's cache instruments. An `App`
    /// rebuilt from a changed row keeps the state (and the series, whose labels are the same).
    pub fn app(&self, app: &App) -> Arc<AppChannels> {
        if let Some(a) = self.apps.read().unwrap_or_else(|p| p.into_inner()).get(&app.id) {
            return a.clone();
        }
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        apps.entry(app.id.clone())
            .or_insert_with(|| {
                Arc::new(AppChannels::with_cache(self.cache, self.node_bytes.clone(), app.attrs.cache_meter()))
            })
            .clone()
    }

    /// Bytes of every app's cached events on this node.
    pub fn cache_bytes(&self) -> u64 {
        self.node_bytes.load(Ordering::Relaxed)
    }

    /// Every app's state (for cache sweeping).
    pub fn all(&self) -> Vec<Arc<AppChannels>> {
        self.apps.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: &str) -> Arc<SocketHandle> {
        Arc::new(SocketHandle::new(Arc::from(id), 1 << 20))
    }

    fn member(id: &str) -> Option<PresenceMember> {
        Some(PresenceMember::parse(&format!(r#"{{"user_id":"{id}"}}"#), 1024).unwrap())
    }

    #[test]
    fn presence_counts_users_once() {
        let chans = AppChannels::new(Duration::from_secs(60));
        let ch = ChannelName::parse("presence-a", 200).unwrap();
        let (a, b) = (handle("1.1"), handle("1.2"));
        let s1 = chans.subscribe(&ch, &a, member("u"), 100).unwrap();
        assert!(s1.occupied && s1.member_added);
        let s2 = chans.subscribe(&ch, &b, member("u"), 100).unwrap();
        assert!(!s2.occupied && !s2.member_added);
        assert_eq!(chans.info(&ch).user_count, 1);
        let u1 = chans.unsubscribe("presence-a", "1.1").unwrap();
        assert!(u1.member_removed.is_none() && !u1.vacated);
        let u2 = chans.unsubscribe("presence-a", "1.2").unwrap();
        assert_eq!(u2.member_removed.as_deref(), Some("u"));
        assert!(u2.vacated);
        assert_eq!(chans.channel_count(), 0);
    }

    #[test]
    fn presence_limit() {
        let chans = AppChannels::new(Duration::from_secs(60));
        let ch = ChannelName::parse("presence-a", 200).unwrap();
        chans.subscribe(&ch, &handle("1.1"), member("u1"), 1).unwrap();
        assert_eq!(chans.subscribe(&ch, &handle("1.2"), member("u2"), 1).unwrap_err(), SubscribeError::PresenceFull(1));
        // Another socket of a present user still joins.
        assert!(chans.subscribe(&ch, &handle("1.3"), member("u1"), 1).is_ok());
    }

    #[test]
    fn snapshot_follows_changes() {
        let chans = AppChannels::new(Duration::from_secs(60));
        let ch = ChannelName::parse("a", 200).unwrap();
        chans.subscribe(&ch, &handle("1.1"), None, 100).unwrap();
        assert_eq!(chans.snapshot("a").unwrap().len(), 1);
        chans.subscribe(&ch, &handle("1.2"), None, 100).unwrap();
        assert_eq!(chans.snapshot("a").unwrap().len(), 2);
        chans.unsubscribe("a", "1.1").unwrap();
        assert_eq!(chans.snapshot("a").unwrap().len(), 1);
    }

    fn bounded(app_bytes: u64, node_bytes: &Arc<AtomicU64>, node_max: u64) -> AppChannels {
        let bounds = CacheBounds { ttl: Duration::from_secs(60), max_app_bytes: app_bytes, max_node_bytes: node_max };
        AppChannels::with_cache(bounds, node_bytes.clone(), None)
    }

    /// A frame of `n` bytes; with a 7-byte channel name (`cache-a`) an entry weighs `n + 7`.
    fn frame(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn cache_replace_adjusts_bytes() {
        let node = Arc::new(AtomicU64::new(0));
        let chans = bounded(1000, &node, 1000);
        assert_eq!(chans.set_cache("cache-a", frame(93)), CacheChange { bytes_delta: 100, evicted: 0 });
        assert_eq!(chans.set_cache("cache-a", frame(43)), CacheChange { bytes_delta: -50, evicted: 0 });
        assert_eq!((chans.cache_bytes(), node.load(Ordering::Relaxed)), (50, 50));
        assert_eq!(chans.cached("cache-a").unwrap().len(), 43);
        drop(chans);
        assert_eq!(node.load(Ordering::Relaxed), 0, "a dropped app gives its bytes back");
    }

    #[test]
    fn cache_expiry_frees_bytes() {
        let node = Arc::new(AtomicU64::new(0));
        let bounds = CacheBounds { ttl: Duration::ZERO, max_app_bytes: 1000, max_node_bytes: 1000 };
        let chans = AppChannels::with_cache(bounds, node.clone(), None);
        chans.set_cache("cache-a", frame(93));
        assert_eq!(node.load(Ordering::Relaxed), 100);
        // A store first drops what has expired (`a`), oldest first.
        chans.set_cache("cache-b", frame(93));
        assert_eq!((chans.cache_bytes(), node.load(Ordering::Relaxed)), (100, 100));
        // Reading an expired event drops it.
        assert!(chans.cached("cache-b").is_none());
        assert_eq!((chans.cache_bytes(), node.load(Ordering::Relaxed)), (0, 0));
        // So does the sweep.
        chans.set_cache("cache-c", frame(93));
        assert_eq!(chans.sweep_cache(), 0);
        assert_eq!((chans.cache_bytes(), node.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn cache_evicts_oldest_first_within_the_app_bound() {
        let node = Arc::new(AtomicU64::new(0));
        let chans = bounded(300, &node, u64::MAX);
        for c in ["cache-a", "cache-b", "cache-c"] {
            assert_eq!(chans.set_cache(c, frame(93)).evicted, 0);
        }
        // The fourth evicts the oldest, `a`.
        assert_eq!(chans.set_cache("cache-d", frame(93)), CacheChange { bytes_delta: 0, evicted: 1 });
        assert!(chans.cached("cache-a").is_none());
        // Replacing `b` makes it the newest, so `c` is the next to go.
        chans.set_cache("cache-b", frame(93));
        assert_eq!(chans.set_cache("cache-e", frame(93)).evicted, 1);
        assert!(chans.cached("cache-c").is_none());
        for c in ["cache-b", "cache-d", "cache-e"] {
            assert!(chans.cached(c).is_some(), "{c}");
        }
        // A bigger event evicts as many as it needs, oldest first.
        assert_eq!(chans.set_cache("cache-f", frame(193)).evicted, 2);
        assert!(chans.cached("cache-e").is_some() && chans.cached("cache-d").is_none());
        assert_eq!((chans.cache_bytes(), node.load(Ordering::Relaxed)), (300, 300));
    }

    #[test]
    fn cache_refuses_an_event_above_the_app_bound() {
        let node = Arc::new(AtomicU64::new(0));
        let chans = bounded(300, &node, u64::MAX);
        chans.set_cache("cache-a", frame(93));
        chans.set_cache("cache-b", frame(93));
        // Too big on its own: not stored, counted, and `a`'s old event is not replayed either.
        assert_eq!(chans.set_cache("cache-a", frame(301)), CacheChange { bytes_delta: -100, evicted: 1 });
        assert!(chans.cached("cache-a").is_none());
        assert!(chans.cached("cache-b").is_some(), "other channels are kept");
        assert_eq!(node.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn cache_node_bound_never_evicts_another_app() {
        let node = Arc::new(AtomicU64::new(0));
        let (a, b) = (bounded(1000, &node, 300), bounded(1000, &node, 300));
        for c in ["cache-a", "cache-b", "cache-c"] {
            a.set_cache(c, frame(93));
        }
        // The node is full of app A's events: B has nothing to evict, so its event is refused.
        assert_eq!(b.set_cache("cache-x", frame(93)), CacheChange { bytes_delta: 0, evicted: 1 });
        assert!(b.cached("cache-x").is_none());
        assert_eq!((a.cache_bytes(), node.load(Ordering::Relaxed)), (300, 300));
        // A writing again evicts its own oldest.
        assert_eq!(a.set_cache("cache-d", frame(93)).evicted, 1);
        assert!(a.cached("cache-a").is_none() && a.cached("cache-b").is_some());
        // Once A's events shrink (b, c: 10 bytes each), B stores, and then evicts only its own.
        a.set_cache("cache-b", frame(3));
        a.set_cache("cache-c", frame(3));
        assert_eq!(a.cache_bytes(), 120);
        assert_eq!(b.set_cache("cache-x", frame(93)).evicted, 0);
        assert_eq!(b.set_cache("cache-y", frame(93)).evicted, 1, "B's own x goes, not A's");
        assert!(b.cached("cache-x").is_none() && b.cached("cache-y").is_some());
        assert!(["cache-b", "cache-c", "cache-d"].iter().all(|c| a.cached(c).is_some()));
        assert_eq!((a.cache_bytes(), b.cache_bytes(), node.load(Ordering::Relaxed)), (120, 100, 220));
    }

    #[test]
    fn cache_count_bound_evicts_oldest() {
        let chans = AppChannels::new(Duration::from_secs(60));
        for i in 0..MAX_CACHED_CHANNELS {
            chans.set_cache(&format!("cache-{i}"), frame(1));
        }
        assert_eq!(chans.set_cache("cache-new", frame(1)).evicted, 1);
        assert!(chans.cached("cache-0").is_none() && chans.cached("cache-1").is_some());
    }
}
