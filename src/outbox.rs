//! A connection's send queue: bounded in bytes, with a separate lane for control frames (pongs,
//! errors, subscription replies) so they never wait behind a broadcast flood, and a close
//! request that the connection's writer acts on. Producers never block and never allocate
//! beyond the cap: a push that would pass it marks the connection as a slow consumer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// Anything queued reports its size in bytes.
pub trait Weighted {
    fn weight(&self) -> usize;
}

/// The result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The byte cap would be passed: the item was dropped and the outbox is now closing with
    /// [`CloseReason::SlowConsumer`].
    Overflow,
    /// The outbox is closing; the item was dropped.
    Closed,
}

/// Why the writer should close the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    SlowConsumer,
    /// A close with this code and reason (shutdown, terminate, protocol error).
    Code(u16, String),
}

/// Control frames are few (replies to the client's own requests); past this many queued the
/// client is not reading and is treated as a slow consumer.
const MAX_CONTROL_ITEMS: usize = 1024;

pub struct Outbox<T> {
    state: Mutex<State<T>>,
    /// The one writer's waker and a "something was queued" flag: a broadcast to N sockets
    /// costs N flag stores and wakes, not N trips through a waiter list (tokio's `Notify`
    /// takes a mutex per `notify_one` when a task waits, which showed in profiles).
    writer: AtomicWaker,
    dirty: AtomicBool,
    /// Woken when a close is requested, so a writer blocked on a slow socket can give up.
    closing: Notify,
    cap_bytes: usize,
    /// A total shared with other outboxes (all sockets of one app), kept equal to the sum of
    /// their queued data bytes: read at collection time for `socket_send_queue_bytes`, so that
    /// slow consumers show before they are closed, at the cost of one atomic add per change.
    total: Option<Arc<AtomicUsize>>,
}

struct State<T> {
    control: VecDeque<T>,
    frames: VecDeque<T>,
    bytes: usize,
    close: Option<CloseReason>,
}

/// What one drain took out.
pub struct Drained {
    /// Set once; the writer flushes what it took and then closes.
    pub close: Option<CloseReason>,
}

impl<T: Weighted> Outbox<T> {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State { control: VecDeque::new(), frames: VecDeque::new(), bytes: 0, close: None }),
            writer: AtomicWaker::new(),
            dirty: AtomicBool::new(false),
            closing: Notify::new(),
            cap_bytes,
            total: None,
        }
    }

    /// An outbox whose queued data bytes are also counted in `total`.
    pub fn counted(cap_bytes: usize, total: Arc<AtomicUsize>) -> Self {
        Self { total: Some(total), ..Self::new(cap_bytes) }
    }

    fn added(&self, bytes: usize) {
        if let Some(t) = &self.total {
            t.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Empties the data lane's byte count (the frames went out or were dropped).
    fn emptied(&self, s: &mut State<T>) {
        if let Some(t) = &self.total {
            t.fetch_sub(s.bytes, Ordering::Relaxed);
        }
        s.bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a plain push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a data frame (a broadcast or an event) under the byte cap.
    pub fn push(&self, item: T) -> Push {
        let result = {
            let mut s = self.lock();
            if s.close.is_some() {
                Push::Closed
            } else if s.bytes + item.weight() > self.cap_bytes {
                s.frames.clear();
                self.emptied(&mut s);
                s.close = Some(CloseReason::SlowConsumer);
                Push::Overflow
            } else {
                s.bytes += item.weight();
                self.added(item.weight());
                s.frames.push_back(item);
                Push::Queued
            }
        };
        if result != Push::Closed {
            self.wake(result == Push::Overflow);
        }
        result
    }

    /// Queues a control frame ahead of data frames.
    pub fn push_control(&self, item: T) -> Push {
        let result = {
            let mut s = self.lock();
            if s.close.is_some() {
                Push::Closed
            } else if s.control.len() >= MAX_CONTROL_ITEMS {
                s.frames.clear();
                self.emptied(&mut s);
                s.close = Some(CloseReason::SlowConsumer);
                Push::Overflow
            } else {
                s.control.push_back(item);
                Push::Queued
            }
        };
        if result != Push::Closed {
            self.wake(result == Push::Overflow);
        }
        result
    }

    /// Asks the writer to close; the first reason wins. Queued data frames are dropped, queued
    /// control frames (an error frame explaining the close) are still sent.
    pub fn close(&self, reason: CloseReason) {
        {
            let mut s = self.lock();
            if s.close.is_some() {
                return;
            }
            s.frames.clear();
            self.emptied(&mut s);
            s.close = Some(reason);
        }
        self.wake(true);
    }

    /// Queues a last control frame and closes in one step, so nothing slips in between.
    pub fn close_with(&self, last: T, reason: CloseReason) {
        {
            let mut s = self.lock();
            if s.close.is_some() {
                return;
            }
            s.frames.clear();
            self.emptied(&mut s);
            s.control.push_back(last);
            s.close = Some(reason);
        }
        self.wake(true);
    }

    /// Resolves once a close has been requested.
    pub async fn closing(&self) {
        loop {
            let woken = self.closing.notified();
            if self.lock().close.is_some() {
                return;
            }
            woken.await;
        }
    }

    fn wake(&self, closed: bool) {
        self.dirty.store(true, Ordering::Release);
        self.writer.wake();
        if closed {
            self.closing.notify_waiters();
        }
    }

    /// Moves everything queued into `out` (control frames first).
    pub fn drain(&self, out: &mut Vec<T>) -> Drained {
        // Cleared before taking the lock: a push after this point sets it again, so nothing
        // queued can be missed by the next `notified`.
        self.dirty.store(false, Ordering::Release);
        let mut s = self.lock();
        out.extend(s.control.drain(..));
        out.extend(s.frames.drain(..));
        self.emptied(&mut s);
        Drained { close: s.close.clone() }
    }

    /// Resolves when something was queued (or a close requested) since the last drain, even
    /// if that happened before the wait began. Only one task (the connection's writer) waits.
    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.dirty.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.writer.register(cx.waker());
            // Checked again after registering: a push between the first check and the
            // registration woke the previous waker, not this one.
            if self.dirty.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct B(usize);
    impl Weighted for B {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn bounded_in_bytes() {
        let o = Outbox::new(10);
        assert_eq!(o.push(B(6)), Push::Queued);
        assert_eq!(o.push_control(B(100)), Push::Queued);
        assert_eq!(o.push(B(5)), Push::Overflow);
        assert_eq!(o.push(B(1)), Push::Closed);
        let mut out = Vec::new();
        let d = o.drain(&mut out);
        assert_eq!(d.close, Some(CloseReason::SlowConsumer));
        // The control frame survives; the data frames were dropped with the overflow.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 100);
    }

    #[tokio::test]
    async fn notified_sees_pushes_before_and_after_the_wait() {
        let o = std::sync::Arc::new(Outbox::new(100));
        // A push before the wait counts.
        o.push(B(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), o.notified()).await.expect("stored push");
        let mut out = Vec::new();
        o.drain(&mut out);
        // After a drain with nothing new, the wait does not resolve...
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), o.notified()).await.is_err());
        // ...until another task pushes.
        let pusher = {
            let o = o.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                o.push(B(1));
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), o.notified()).await.expect("woken by a push");
        pusher.await.unwrap();
    }

    #[test]
    fn a_shared_total_follows_every_change() {
        let total = Arc::new(AtomicUsize::new(0));
        let (a, b) = (Outbox::counted(10, total.clone()), Outbox::counted(10, total.clone()));
        a.push(B(4));
        a.push(B(3));
        b.push(B(5));
        a.push_control(B(100));
        assert_eq!(total.load(Ordering::Relaxed), 12, "data bytes only");
        assert_eq!(a.push(B(4)), Push::Overflow);
        assert_eq!(total.load(Ordering::Relaxed), 5, "an overflow drops a's frames");
        b.drain(&mut Vec::new());
        assert_eq!(total.load(Ordering::Relaxed), 0);
        b.push(B(2));
        b.close(CloseReason::SlowConsumer);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn drain_frees_budget() {
        let o = Outbox::new(10);
        assert_eq!(o.push(B(10)), Push::Queued);
        let mut out = Vec::new();
        o.drain(&mut out);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.push(B(10)), Push::Queued);
    }
}
