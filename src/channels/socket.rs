//! What channels hold of a socket: its id, its bounded [`Outbox`] of [`Frame`]s, and the user
//! it signed in as. A [`Delivery`] rides along a broadcast's frames to record its latency when
//! the last local recipient's write completes.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;

use crate::app::App;
use crate::outbox::{Outbox, Push, Weighted};
use crate::protocol::ChannelType;
use crate::telemetry::Metrics;

pub type SocketId = Arc<str>;

/// One queued WebSocket text frame; cloning shares the bytes.
#[derive(Clone)]
pub struct Frame {
    pub text: Utf8Bytes,
    pub delivery: Option<Arc<Delivery>>,
}

impl Frame {
    pub fn new(text: Utf8Bytes) -> Self {
        Self { text, delivery: None }
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Self {
        Self::new(Utf8Bytes::from(s))
    }
}

impl Weighted for Frame {
    fn weight(&self) -> usize {
        self.text.len()
    }
}

/// Tracks one broadcast on this node until its frame is written to every local recipient.
/// Each recipient's queued [`Frame`] holds a clone; the writer drops its clone once the write
/// completes (and a dropped or refused frame drops it too), so the last drop is the moment the
/// last local recipient was served, and that is when the latency is recorded.
///
/// It also holds the broadcast's span (`broadcast` or `broadcast.remote`), so the span ends at
/// the last write, with `sockudo.last_write_ms`: a tail-sampling collector keeping slow traces
/// sees the time to the last socket, not only the time to queue. One span clone per broadcast.
pub struct Delivery {
    started: Instant,
    recipients: usize,
    channel_type: ChannelType,
    app: Arc<App>,
    metrics: Arc<Metrics>,
    span: tracing::Span,
}

impl Delivery {
    /// A delivery of the current span's broadcast.
    pub fn new(
        started: Instant,
        recipients: usize,
        channel_type: ChannelType,
        app: Arc<App>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self { started, recipients, channel_type, app, metrics, span: tracing::Span::current() })
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.broadcast_latency(&self.app.attrs, self.channel_type, self.recipients, ms);
        self.span.record("sockudo.last_write_ms", ms);
    }
}

/// A socket as channels see it.
pub struct SocketHandle {
    pub id: SocketId,
    pub outbox: Outbox<Frame>,
    user_id: OnceLock<Arc<str>>,
}

impl SocketHandle {
    pub fn new(id: SocketId, queue_cap_bytes: usize) -> Self {
        Self { id, outbox: Outbox::new(queue_cap_bytes), user_id: OnceLock::new() }
    }

    /// A socket whose queued bytes count in its app's `total` (`socket_send_queue_bytes`).
    pub fn counted(id: SocketId, queue_cap_bytes: usize, total: Arc<AtomicUsize>) -> Self {
        Self { id, outbox: Outbox::counted(queue_cap_bytes, total), user_id: OnceLock::new() }
    }

    /// The signed-in user, if any.
    pub fn user_id(&self) -> Option<&Arc<str>> {
        self.user_id.get()
    }

    /// Records the sign-in; a socket signs in once (a second sign-in as another user fails).
    pub fn set_user(&self, id: Arc<str>) -> bool {
        self.user_id.set(id.clone()).is_ok() || self.user_id.get() == Some(&id)
    }

    /// Queues a data frame.
    pub fn send(&self, frame: Frame) -> Push {
        self.outbox.push(frame)
    }

    /// Queues a control frame (a reply to this socket's own request).
    pub fn reply(&self, text: String) -> Push {
        self.outbox.push_control(Frame::from(text))
    }
}
