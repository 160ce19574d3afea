//! The bounded TTL cache in front of an app table: entries by key and by id (misses too, so a
//! flood of unknown keys does not reach the database), stale entries that the database could not
//! refresh, and the apps still referenced by open sockets, so that a refill keeps an app's
//! connection counter. Synchronous: callers hold its mutex only between awaits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::config::AppConfig;
use crate::telemetry::Metrics;

use super::App;

/// Entries per index at most; past it expired entries are purged, then a miss is not cached and
/// an app evicts a miss or, failing that, another entry.
pub(super) const MAX_ENTRIES: usize = 10_000;

/// A full cache is swept for expired entries at most this often.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Which index a lookup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum By {
    Key,
    Id,
}

/// What the cache knows about a key or id.
#[derive(Debug)]
pub(super) enum Cached {
    /// Within its TTL: the app, or `None` for a recent miss.
    Fresh(Option<Arc<App>>),
    /// Past its TTL. The caller refreshes it; until `claim` passes, others get it as fresh.
    Stale(Option<Arc<App>>),
    Absent,
}

struct Entry {
    app: Option<Arc<App>>,
    expires: Instant,
}

pub(super) struct AppCache {
    by_key: HashMap<String, Entry>,
    by_id: HashMap<String, Entry>,
    /// Cached misses in the order they were cached, oldest first, for eviction.
    misses_by_key: VecDeque<String>,
    misses_by_id: VecDeque<String>,
    /// Every app built and not yet dropped, by id: a refill with the same settings reuses it, and
    /// one with new settings shares its connection counter.
    live: HashMap<String, Weak<App>>,
    cap: usize,
    last_purge: Option<Instant>,
    /// The database failed: until then, lookups do not ask it again.
    down_until: Option<Instant>,
}

impl AppCache {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            by_id: HashMap::new(),
            misses_by_key: VecDeque::new(),
            misses_by_id: VecDeque::new(),
            live: HashMap::new(),
            cap,
            last_purge: None,
            down_until: None,
        }
    }

    fn index(&mut self, by: By) -> &mut HashMap<String, Entry> {
        match by {
            By::Key => &mut self.by_key,
            By::Id => &mut self.by_id,
        }
    }

    /// The entry for `needle`. A stale one is claimed for `claim`, so that one caller refreshes it
    /// while the others keep using it.
    pub(super) fn get(&mut self, by: By, needle: &str, now: Instant, claim: Duration) -> Cached {
        match self.index(by).get_mut(needle) {
            Some(e) if e.expires > now => Cached::Fresh(e.app.clone()),
            Some(e) => {
                e.expires = now + claim;
                Cached::Stale(e.app.clone())
            }
            None => Cached::Absent,
        }
    }

    /// The cached app for `needle`, however old, without claiming or refreshing anything.
    pub(super) fn peek(&self, by: By, needle: &str) -> Option<Arc<App>> {
        self.index_ref(by).get(needle).and_then(|e| e.app.clone())
    }

    fn index_ref(&self, by: By) -> &HashMap<String, Entry> {
        match by {
            By::Key => &self.by_key,
            By::Id => &self.by_id,
        }
    }

    pub(super) fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| t > now)
    }

    pub(super) fn mark_down(&mut self, until: Instant) {
        self.down_until = Some(until);
    }

    /// Caches an app read from the database under its key and its id. The `App` is reused when
    /// its settings are unchanged; otherwise it is built once here and takes over the counter
    /// of open connections from the one it replaces.
    pub(super) fn fill(&mut self, settings: AppConfig, metrics: &Metrics, now: Instant, ttl: Duration) -> Arc<App> {
        let previous = self.live.get(&settings.id).and_then(Weak::upgrade);
        let app = match previous {
            Some(old) if old.settings == settings => old,
            Some(old) => {
                let new = Arc::new(App::with_connections(settings, metrics, old.connections.clone()));
                old.replace(super::Replaced::By(new.clone()));
                new
            }
            None => Arc::new(App::new(settings, metrics)),
        };
        if self.live.len() >= self.cap * 2 {
            self.live.retain(|_, w| w.strong_count() > 0);
        }
        self.live.insert(app.id.clone(), Arc::downgrade(&app));
        let expires = now + ttl;
        self.insert(By::Id, app.id.clone(), Entry { app: Some(app.clone()), expires }, now);
        self.insert(By::Key, app.key.clone(), Entry { app: Some(app.clone()), expires }, now);
        app
    }

    /// The row of the app with this id is gone: its open sockets are told, and its entries
    /// leave both indexes.
    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.live.remove(id).and_then(|w| w.upgrade()) {
            self.by_key.remove(&old.key);
            old.replace(super::Replaced::Removed);
        }
        self.by_id.remove(id);
    }

    /// Caches "no such app" for `needle` until `now + ttl`.
    pub(super) fn fill_missing(&mut self, by: By, needle: &str, now: Instant, ttl: Duration) {
        self.insert(by, needle.to_owned(), Entry { app: None, expires: now + ttl }, now);
    }

    fn insert(&mut self, by: By, needle: String, entry: Entry, now: Instant) {
        let cap = self.cap;
        if self.index(by).len() >= cap && !self.index(by).contains_key(&needle) {
            self.purge(now);
            if self.index(by).len() >= cap {
                // The oldest miss makes room (a flood of garbage keys keeps cycling through the
                // misses, never evicting a real app); failing that, an app does, for an app.
                let evicted = self.evict_oldest_miss(by);
                if !evicted {
                    if entry.app.is_none() {
                        return;
                    }
                    let map = self.index(by);
                    if let Some(k) = map.keys().next().cloned() {
                        map.remove(&k);
                    }
                }
            }
        }
        if entry.app.is_none() {
            let order = self.miss_order(by);
            order.push_back(needle.clone());
            // Keys already gone from the index linger here until popped: bound them too.
            if order.len() > cap * 2 {
                order.pop_front();
            }
        }
        self.index(by).insert(needle, entry);
    }

    fn miss_order(&mut self, by: By) -> &mut VecDeque<String> {
        match by {
            By::Key => &mut self.misses_by_key,
            By::Id => &mut self.misses_by_id,
        }
    }

    /// Removes the oldest cached miss of the index; false when it holds none. Amortised O(1):
    /// each key is pushed once per miss and popped once.
    fn evict_oldest_miss(&mut self, by: By) -> bool {
        while let Some(k) = self.miss_order(by).pop_front() {
            let map = self.index(by);
            if map.get(&k).is_some_and(|e| e.app.is_none()) {
                map.remove(&k);
                return true;
            }
        }
        false
    }

    /// Drops expired entries and dropped apps, at most once per `PURGE_EVERY`.
    fn purge(&mut self, now: Instant) {
        if self.last_purge.is_some_and(|t| now.saturating_duration_since(t) < PURGE_EVERY) {
            return;
        }
        self.last_purge = Some(now);
        self.by_key.retain(|_, e| e.expires > now);
        self.by_id.retain(|_, e| e.expires > now);
        self.live.retain(|_, w| w.strong_count() > 0);
    }

    /// The apps that open connections hold now.
    pub(super) fn in_use(&self) -> Vec<Arc<App>> {
        self.live.values().filter_map(Weak::upgrade).filter(|a| a.connection_count() > 0).collect()
    }

    /// The cached apps, each once.
    pub(super) fn apps(&self) -> Vec<Arc<App>> {
        self.by_id.values().filter_map(|e| e.app.clone()).collect()
    }

    #[cfg(test)]
    fn len(&self, by: By) -> usize {
        self.index_ref(by).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::telemetry::Telemetry;

    fn metrics() -> Arc<Metrics> {
        let mut c = Config::default();
        c.metrics.enabled = false;
        Telemetry::new(&c, 0, "test").unwrap().metrics.clone()
    }

    fn app(id: &str, key: &str) -> AppConfig {
        AppConfig { id: id.into(), key: key.into(), secret: "s".into(), ..AppConfig::default() }
    }

    const TTL: Duration = Duration::from_secs(60);
    const CLAIM: Duration = Duration::from_secs(1);

    #[test]
    fn fresh_stale_and_claimed() {
        let m = metrics();
        let mut c = AppCache::new(10);
        let t0 = Instant::now();
        let a = c.fill(app("1", "k"), &m, t0, TTL);
        assert!(matches!(c.get(By::Key, "k", t0, CLAIM), Cached::Fresh(Some(ref x)) if Arc::ptr_eq(x, &a)));
        assert!(matches!(c.get(By::Id, "1", t0, CLAIM), Cached::Fresh(Some(_))));
        let later = t0 + TTL;
        assert!(matches!(c.get(By::Key, "k", later, CLAIM), Cached::Stale(Some(_))));
        // The first caller past the TTL refreshes; the others keep the entry meanwhile.
        assert!(matches!(c.get(By::Key, "k", later, CLAIM), Cached::Fresh(Some(_))));
        assert!(matches!(c.get(By::Key, "other", t0, CLAIM), Cached::Absent));
        c.fill_missing(By::Key, "other", t0, Duration::from_secs(5));
        assert!(matches!(c.get(By::Key, "other", t0, CLAIM), Cached::Fresh(None)));
    }

    #[test]
    fn refill_keeps_the_app_or_its_counter() {
        let m = metrics();
        let mut c = AppCache::new(10);
        let t0 = Instant::now();
        let a = c.fill(AppConfig { max_connections: 2, ..app("1", "k") }, &m, t0, TTL);
        assert!(a.try_acquire_connection());
        let same = c.fill(AppConfig { max_connections: 2, ..app("1", "k") }, &m, t0, TTL);
        assert!(Arc::ptr_eq(&a, &same), "unchanged settings reuse the app");
        let changed = c.fill(AppConfig { max_connections: 2, enabled: false, ..app("1", "k") }, &m, t0, TTL);
        assert!(!Arc::ptr_eq(&a, &changed));
        assert!(!changed.settings.enabled);
        assert_eq!(changed.connection_count(), 1, "the open connection is still counted");
        assert!(changed.try_acquire_connection());
        assert!(!changed.try_acquire_connection(), "the quota spans the old and the new app");
        a.release_connection();
        assert_eq!(changed.connection_count(), 1);
    }

    #[test]
    fn bounded() {
        let m = metrics();
        let mut c = AppCache::new(3);
        let t0 = Instant::now();
        for i in 0..10 {
            c.fill_missing(By::Key, &format!("miss{i}"), t0, TTL);
        }
        assert_eq!(c.len(By::Key), 3, "the cache stays at its bound");
        // The newest misses are kept, the oldest evicted (a flood cycles through the misses).
        assert!(matches!(c.get(By::Key, "miss9", t0, CLAIM), Cached::Fresh(None)));
        assert!(matches!(c.get(By::Key, "miss0", t0, CLAIM), Cached::Absent));
        c.fill(app("1", "k"), &m, t0, TTL);
        assert_eq!(c.len(By::Key), 3, "an app evicts a miss");
        assert!(matches!(c.get(By::Key, "k", t0, CLAIM), Cached::Fresh(Some(_))));
        for i in 0..10 {
            c.fill_missing(By::Key, &format!("garbage{i}"), t0, TTL);
        }
        assert!(matches!(c.get(By::Key, "k", t0, CLAIM), Cached::Fresh(Some(_))), "misses never evict an app");
        for i in 0..10 {
            c.fill(app(&format!("id{i}"), &format!("k{i}")), &m, t0, TTL);
        }
        assert_eq!(c.len(By::Key), 3);
        assert_eq!(c.len(By::Id), 3);
        // Once expired, entries are purged to make room.
        let later = t0 + TTL + PURGE_EVERY;
        c.fill_missing(By::Key, "late", later, TTL);
        assert!(matches!(c.get(By::Key, "late", later, CLAIM), Cached::Fresh(None)));
        assert_eq!(c.len(By::Key), 1);
    }

    #[test]
    fn down() {
        let mut c = AppCache::new(3);
        let t0 = Instant::now();
        assert!(!c.is_down(t0));
        c.mark_down(t0 + CLAIM);
        assert!(c.is_down(t0));
        assert!(!c.is_down(t0 + CLAIM));
    }
}
