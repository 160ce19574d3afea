//! The stop signal and task tracking: one [`Shutdown`] that every task can await, and a
//! [`Tracker`] whose tokens are dropped by finishing tasks so shutdown can wait for them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// A cloneable handle that resolves once shutdown has been triggered.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The one place that triggers shutdown.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A new signal pair.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown { rx: self.tx.subscribe() }
    }
}

impl Shutdown {
    /// Resolves when shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone, which also means stop.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Counts live tasks; [`Tracker::wait_idle`] resolves when the last token is dropped.
#[derive(Clone, Default, Debug)]
pub struct Tracker {
    inner: Arc<TrackerInner>,
}

#[derive(Default, Debug)]
struct TrackerInner {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a task for as long as it runs.
#[derive(Debug)]
pub struct TaskToken {
    inner: Arc<TrackerInner>,
}

impl Tracker {
    pub fn token(&self) -> TaskToken {
        self.inner.live.fetch_add(1, Ordering::AcqRel);
        TaskToken { inner: self.inner.clone() }
    }

    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskToken {
    fn drop(&mut self) {
        if self.inner.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}
