//! Watchlist events: a socket that signs in with a `watchlist` in its `user_data` hears
//! `online` when one of those users' first signed-in socket anywhere in the cluster opens, and
//! `offline` when their last one has been gone for `watchlist_offline_grace_ms` (a reconnect
//! within the grace, to any node, sends neither). Right after signing in it hears one `online`
//! for the watched users already online.
//!
//! Who is online is replicated like presence members, under a reserved key no channel name
//! can take ([`USERS`]): joins and leaves ride the same envelopes, snapshots resynchronise it
//! after an outage, and a node that dies takes its users offline when it is expired (within
//! `adapter.node_timeout_ms`). Only apps with `enable_watchlist_events` track it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::app::App;
use crate::channels::{Frame, SocketHandle};
use crate::protocol::server::{self, Watch};

use super::cluster::{Header, PresenceEvent};
use super::Adapter;

/// The cluster presence key of signed-in users: `#` is in no valid channel name.
pub(super) const USERS: &str = "#users";

/// Users waiting out their offline grace on this node, at most; past it a user goes offline
/// without the grace (the map stays bounded under any churn).
const MAX_LEAVING: usize = 100_000;

/// Users whose last socket here closed and whose grace has not run out: `(app, user)` to the
/// token of the timer that may take them offline (a newer departure gets a newer token).
pub(super) struct Leaving {
    grace: Duration,
    timers: Mutex<HashMap<(String, Arc<str>), u64>>,
    next: AtomicU64,
}

impl Leaving {
    pub(super) fn new(grace: Duration) -> Self {
        Self { grace, timers: Mutex::default(), next: AtomicU64::new(0) }
    }

    fn timers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Arc<str>), u64>> {
        self.timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `user`'s grace; `None` when it goes offline at once (no grace, or the map is full).
    fn start(&self, app: &str, user: &Arc<str>) -> Option<u64> {
        let mut timers = self.timers();
        if self.grace.is_zero() || timers.len() >= MAX_LEAVING {
            return None;
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        timers.insert((app.to_owned(), user.clone()), token);
        Some(token)
    }

    /// Ends the grace started with `token`; false when the user came back or left again since.
    fn finish(&self, app: &str, user: &Arc<str>, token: u64) -> bool {
        let mut timers = self.timers();
        let key = (app.to_owned(), user.clone());
        if timers.get(&key) != Some(&token) {
            return false;
        }
        timers.remove(&key);
        true
    }

    /// The user signed in again within the grace; true when it was waiting.
    fn cancel(&self, app: &str, user: &Arc<str>) -> bool {
        self.timers().remove(&(app.to_owned(), user.clone())).is_some()
    }

    fn contains(&self, app: &str, user: &Arc<str>) -> bool {
        self.timers().contains_key(&(app.to_owned(), user.clone()))
    }
}

impl PresenceEvent {
    /// `(app, user, online/offline)` when this is a change of who is signed in.
    pub(super) fn watchlist(&self) -> Option<(&str, &str, Watch)> {
        match self {
            PresenceEvent::Added { app, channel, user, .. } if channel == USERS => Some((app, user, Watch::Online)),
            PresenceEvent::Removed { app, channel, user } if channel == USERS => Some((app, user, Watch::Offline)),
            _ => None,
        }
    }
}

impl Adapter {
    /// Registers a signed-in socket and its watchlist: tells the user's watchers when this is
    /// its first socket anywhere, and the socket which of its watched users are online.
    pub fn signed_in(
        self: &Arc<Self>,
        app: &Arc<App>,
        handle: &Arc<SocketHandle>,
        user: &Arc<str>,
        watchlist: &[Arc<str>],
    ) {
        let chans = self.registry.app(app);
        let first_here = chans.add_user(user, handle);
        if !app.settings.enable_watchlist_events {
            return;
        }
        // Back within the grace: still online everywhere, nobody is told anything.
        let returned = self.leaving_users.cancel(&app.id, user);
        if first_here && !returned {
            let online = match &self.cluster {
                Some(cluster) => {
                    let header = Header::PresenceJoin {
                        n: cluster.me(),
                        a: app.id.clone(),
                        c: USERS.to_owned(),
                        u: user.to_string(),
                        i: "null".to_owned(),
                    };
                    cluster.send_for(app, &header, b"");
                    cluster.join(&cluster.node, &app.id, USERS, user, "null")
                }
                None => true,
            };
            if online {
                self.tell_watchers(app, user, Watch::Online);
            }
        }
        if watchlist.is_empty() {
            return;
        }
        chans.watch(handle, watchlist);
        let online: Vec<&str> = watchlist.iter().filter(|u| self.is_online(app, u)).map(|u| &**u).collect();
        if !online.is_empty() {
            handle.send(Frame::from(server::watchlist_events(Watch::Online, online.into_iter())));
        }
    }

    /// Undoes [`Adapter::signed_in`] when the socket closes: its user goes offline after the
    /// grace unless another of its sockets is open (here or on another node) by then.
    pub fn signed_out(self: &Arc<Self>, app: &Arc<App>, socket_id: &str, user: &Arc<str>, watchlist: &[Arc<str>]) {
        let chans = self.registry.app(app);
        chans.unwatch(socket_id, watchlist);
        if !chans.remove_user(user, socket_id) || !app.settings.enable_watchlist_events {
            return;
        }
        let Some(token) = self.leaving_users.start(&app.id, user) else {
            return self.left_here(app, user);
        };
        let (this, app, user, grace) = (self.clone(), app.clone(), user.clone(), self.leaving_users.grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if this.leaving_users.finish(&app.id, &user, token) && !this.registry.app(&app).has_user(&user) {
                this.left_here(&app, &user);
            }
        });
    }

    /// The user has no socket on this node any more: offline unless another node has one.
    fn left_here(&self, app: &Arc<App>, user: &Arc<str>) {
        let gone = match &self.cluster {
            Some(cluster) => {
                let header = Header::PresenceLeave {
                    n: cluster.me(),
                    a: app.id.clone(),
                    c: USERS.to_owned(),
                    u: user.to_string(),
                };
                cluster.send_for(app, &header, b"");
                cluster.part(&cluster.node, &app.id, USERS, user)
            }
            None => true,
        };
        if gone {
            self.tell_watchers(app, user, Watch::Offline);
        }
    }

    /// Whether `user` counts as online: signed in on some node, or within its grace here.
    fn is_online(&self, app: &App, user: &Arc<str>) -> bool {
        match &self.cluster {
            Some(cluster) => cluster.present(&app.id, USERS, user),
            None => self.registry.app(app).has_user(user) || self.leaving_users.contains(&app.id, user),
        }
    }

    /// Sends one `online`/`offline` for `user` to the sockets here that watch it (one frame,
    /// serialised once, for all of them).
    pub(super) fn tell_watchers(&self, app: &App, user: &str, watch: Watch) {
        let watchers = self.registry.app(app).watchers(user);
        if watchers.is_empty() {
            return;
        }
        let frame = Frame::from(server::watchlist_events(watch, std::iter::once(user)));
        for socket in &watchers {
            // A refused push (slow consumer) closes that socket; the others are unaffected.
            socket.send(frame.clone());
        }
    }
}
