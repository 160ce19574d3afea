//! The broker links: Redis pub/sub and NATS core, each only moving opaque envelopes on one
//! topic (`{prefix}#cluster` / `{prefix}.cluster`). Cluster semantics live in `cluster.rs`.
//!
//! Both queues are bounded: when the broker is down or slow, outgoing envelopes beyond
//! [`QUEUE`] are dropped (counted and logged), never buffered without bound. A broker lost
//! while running flips `connected` to false and is reconnected with backoff; one unreachable at
//! startup is an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::mask_url_password;

/// Envelopes queued in each direction at most.
pub const QUEUE: usize = 65_536;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connected broker: send envelopes, receive everyone's (including, on Redis, our own).
pub struct Link {
    pub outgoing: mpsc::Sender<Bytes>,
    pub incoming: mpsc::Receiver<Bytes>,
    /// Whether the subscription is up right now.
    pub connected: watch::Receiver<bool>,
    /// Envelopes dropped by the link itself, by direction.
    pub drops: Arc<Drops>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Envelopes a link dropped: received while the inbox was full, or not handed to the broker
/// (a failed publish; on Redis one failed pipeline counts each envelope in it).
#[derive(Debug, Default)]
pub struct Drops {
    pub incoming: AtomicU64,
    pub outgoing: AtomicU64,
}

fn forward(tx: &mpsc::Sender<Bytes>, drops: &Drops, payload: Bytes) {
    if tx.try_send(payload).is_err() {
        let n = drops.incoming.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "cluster inbox full; envelopes dropped");
        }
    }
}

/// Connects to Redis at `url` (fails if it cannot within 5 s).
pub async fn redis(url: &str, prefix: &str) -> Result<Link, String> {
    let shown = mask_url_password(url);
    let fail = |e: &dyn std::fmt::Display| format!("cannot connect to Redis at {shown}: {e}");
    let client = redis::Client::open(url).map_err(|e| fail(&e))?;
    let topic = format!("{prefix}#cluster");
    let mut publisher = tokio::time::timeout(CONNECT_TIMEOUT, redis::aio::ConnectionManager::new(client.clone()))
        .await
        .map_err(|_| fail(&"timed out"))?
        .map_err(|e| fail(&e))?;
    let subscribe = |client: redis::Client, topic: String| async move {
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(&topic).await?;
        Ok::<_, redis::RedisError>(ps.into_on_message())
    };
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(client.clone(), topic.clone()))
        .await
        .map_err(|_| fail(&"timed out"))?
        .map_err(|e| fail(&e))?;
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (up_tx, up_rx) = watch::channel(true);
    let drops = Arc::new(Drops::default());

    let pub_topic = topic.clone();
    let pub_drops = drops.clone();
    let publisher_task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        let mut failed_batches = 0u64;
        while out_rx.recv_many(&mut batch, 256).await > 0 {
            let mut pipe = redis::pipe();
            let count = batch.len() as u64;
            for payload in batch.drain(..) {
                pipe.cmd("PUBLISH").arg(&pub_topic).arg(&payload[..]).ignore();
            }
            // Pipelined: one round trip per batch. While the broker is down these fail and
            // are dropped; the connection manager reconnects on its own.
            if let Err(err) = pipe.query_async::<()>(&mut publisher).await {
                pub_drops.outgoing.fetch_add(count, Ordering::Relaxed);
                failed_batches += 1;
                if failed_batches.is_power_of_two() {
                    tracing::warn!(error = %err, failed_batches, "publishing to Redis failed");
                }
            }
        }
    });

    let sub_drops = drops.clone();
    let subscriber_task = tokio::spawn(async move {
        loop {
            while let Some(msg) = stream.next().await {
                forward(&in_tx, &sub_drops, Bytes::copy_from_slice(msg.get_payload_bytes()));
            }
            up_tx.send_replace(false);
            tracing::warn!(url = %shown, "Redis subscription lost; serving local sockets only while reconnecting");
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(client.clone(), topic.clone())).await
                {
                    stream = s;
                    break;
                }
            }
            up_tx.send_replace(true);
            tracing::info!(url = %shown, "Redis subscription restored");
        }
    });
    Ok(Link {
        outgoing: out_tx,
        incoming: in_rx,
        connected: up_rx,
        drops,
        tasks: vec![publisher_task, subscriber_task],
    })
}

/// Connects to NATS (fails if no server answers within 5 s); async-nats reconnects and
/// resubscribes on its own afterwards.
pub async fn nats(servers: &[String], prefix: &str) -> Result<Link, String> {
    let shown: Vec<String> = servers.iter().map(|s| mask_url_password(s)).collect();
    let fail = |e: &dyn std::fmt::Display| format!("cannot connect to NATS at {}: {e}", shown.join(","));
    let addrs = servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    let (up_tx, up_rx) = watch::channel(false);
    let events = up_tx.clone();
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        events.send_replace(true);
                        tracing::info!("NATS connection restored");
                    }
                    async_nats::Event::Disconnected => {
                        events.send_replace(false);
                        tracing::warn!("NATS connection lost; serving local sockets only while reconnecting");
                    }
                    _ => {}
                }
            }
        });
    let client = tokio::time::timeout(
        CONNECT_TIMEOUT + Duration::from_secs(1),
        async_nats::connect_with_options(addrs, options),
    )
    .await
    .map_err(|_| fail(&"timed out"))?
    .map_err(|e| fail(&e))?;
    up_tx.send_replace(true);
    let subject = format!("{prefix}.cluster");
    let mut subscription = client.subscribe(subject.clone()).await.map_err(|e| fail(&e))?;
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let drops = Arc::new(Drops::default());
    let pub_drops = drops.clone();
    let publisher_task = tokio::spawn(async move {
        while let Some(payload) = out_rx.recv().await {
            if client.publish(subject.clone(), payload).await.is_err() {
                pub_drops.outgoing.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let sub_drops = drops.clone();
    let subscriber_task = tokio::spawn(async move {
        while let Some(msg) = subscription.next().await {
            forward(&in_tx, &sub_drops, msg.payload);
        }
    });
    Ok(Link {
        outgoing: out_tx,
        incoming: in_rx,
        connected: up_rx,
        drops,
        tasks: vec![publisher_task, subscriber_task],
    })
}
