//! The outgoing queue of a broker link, fair between apps: one FIFO lane per app plus one for
//! the node's own envelopes (heartbeats, snapshots, queries and answers), drained in turns.
//!
//! With one FIFO for everything, an app publishing large events at a high rate queued ahead of
//! every other app's envelopes, so the others' cross-node latency grew with its traffic (and a
//! full queue dropped theirs too). Here the publisher takes the node lane first, then one
//! envelope from each app with something queued, in turn, so an app waits behind at most one
//! envelope of each other app. Bounds: `total` envelopes in all, `per_lane` of one app (the node
//! lane shares only `total`); past either, `push` refuses and the caller counts the drop.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// Why an envelope was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The whole queue is full.
    Queue,
    /// The app's lane is full.
    App,
}

#[derive(Default)]
struct State {
    node: VecDeque<Bytes>,
    lanes: HashMap<String, VecDeque<Bytes>>,
    /// Apps with something queued, in the order they get their next turn.
    turn: VecDeque<String>,
    total: usize,
}

pub struct Lanes {
    state: Mutex<State>,
    /// One waiter (the link's publisher); `notify_one` keeps a wake-up for it if it is busy.
    ready: Notify,
    total: usize,
    per_lane: usize,
}

impl Lanes {
    pub fn new(total: usize, per_lane: usize) -> Self {
        Self { state: Mutex::default(), ready: Notify::new(), total, per_lane }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections only move queue entries; a panic inside one leaves them usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `payload` in `app`'s lane (the node's with `None`). Never waits.
    pub fn push(&self, app: Option<&str>, payload: Bytes) -> Result<(), Full> {
        {
            let mut s = self.lock();
            if s.total >= self.total {
                return Err(Full::Queue);
            }
            match app {
                None => s.node.push_back(payload),
                Some(app) => {
                    let lane = match s.lanes.get_mut(app) {
                        Some(lane) => lane,
                        None => {
                            s.turn.push_back(app.to_owned());
                            s.lanes.entry(app.to_owned()).or_default()
                        }
                    };
                    if lane.len() >= self.per_lane {
                        return Err(Full::App);
                    }
                    lane.push_back(payload);
                }
            }
            s.total += 1;
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Moves up to `max` envelopes into `out` (the node's first, then the apps' in turns),
    /// waiting until there is at least one; returns how many.
    pub async fn take(&self, out: &mut Vec<Bytes>, max: usize) -> usize {
        loop {
            let n = self.take_now(out, max);
            if n > 0 {
                return n;
            }
            self.ready.notified().await;
        }
    }

    fn take_now(&self, out: &mut Vec<Bytes>, max: usize) -> usize {
        let mut s = self.lock();
        let before = out.len();
        while out.len() - before < max {
            if let Some(p) = s.node.pop_front() {
                out.push(p);
                continue;
            }
            let Some(app) = s.turn.pop_front() else { break };
            let Some(lane) = s.lanes.get_mut(&app) else { continue };
            if let Some(p) = lane.pop_front() {
                out.push(p);
            }
            if lane.is_empty() {
                s.lanes.remove(&app);
            } else {
                s.turn.push_back(app);
            }
        }
        let n = out.len() - before;
        s.total -= n;
        n
    }

    /// Envelopes queued now (all lanes).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn apps_take_turns_and_the_node_goes_first() {
        let lanes = Lanes::new(100, 10);
        for i in 0..5 {
            lanes.push(Some("flood"), b(&format!("f{i}"))).unwrap();
        }
        lanes.push(Some("calm"), b("c0")).unwrap();
        lanes.push(None, b("heartbeat")).unwrap();
        lanes.push(Some("calm"), b("c1")).unwrap();
        let mut out = Vec::new();
        assert_eq!(lanes.take(&mut out, 4).await, 4);
        assert_eq!(out, [b("heartbeat"), b("f0"), b("c0"), b("f1")]);
        out.clear();
        assert_eq!(lanes.take(&mut out, 100).await, 4);
        assert_eq!(out, [b("c1"), b("f2"), b("f3"), b("f4")], "each app in order within its lane");
        assert_eq!(lanes.len(), 0);
    }

    #[tokio::test]
    async fn a_full_lane_refuses_only_its_app() {
        let lanes = Lanes::new(5, 3);
        for _ in 0..3 {
            lanes.push(Some("a"), b("a")).unwrap();
        }
        assert_eq!(lanes.push(Some("a"), b("a")), Err(Full::App));
        lanes.push(Some("b"), b("b")).unwrap();
        lanes.push(None, b("n")).unwrap();
        assert_eq!(lanes.push(Some("c"), b("c")), Err(Full::Queue));
        assert_eq!(lanes.push(None, b("n")), Err(Full::Queue));
        let mut out = Vec::new();
        lanes.take(&mut out, 2).await;
        assert_eq!(out, [b("n"), b("a")]);
        lanes.push(Some("a"), b("a")).unwrap();
        assert_eq!(lanes.push(Some("a"), b("a")), Err(Full::App), "a's lane is full again");
        lanes.push(Some("c"), b("c")).unwrap();
        assert_eq!(lanes.len(), 5);
    }

    #[tokio::test]
    async fn take_waits_for_a_push() {
        let lanes = std::sync::Arc::new(Lanes::new(10, 10));
        let l = lanes.clone();
        let waiter = tokio::spawn(async move {
            let mut out = Vec::new();
            l.take(&mut out, 10).await;
            out
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        lanes.push(Some("a"), b("x")).unwrap();
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(out, [b("x")]);
    }
}
