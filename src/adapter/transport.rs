//! The broker links: Redis pub/sub (one server, a Sentinel-managed master, or sharded pub/sub
//! on a Redis Cluster) and NATS core, each only moving opaque envelopes on one topic
//! (`{prefix}#cluster` / `{prefix}.cluster`), over TLS and with credentials when configured.
//! Cluster semantics live in `cluster.rs`.
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

use super::lanes::Lanes;
use crate::config::{NatsConfig, RedisConfig};
use crate::redis_client::{Commands, Redis, SetupError, Target, CONNECT_TIMEOUT};

/// Envelopes queued in each direction at most.
pub const QUEUE: usize = 65_536;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One app's share of the outgoing queue: a quarter, so that a flood from one app leaves the
/// rest for the others and for the node's own envelopes.
pub const APP_SHARE: usize = QUEUE / 4;

fn outgoing_lanes() -> Arc<Lanes> {
    Arc::new(Lanes::new(QUEUE, APP_SHARE))
}

/// A connected broker: send envelopes, receive everyone's (including, on Redis, our own).
pub struct Link {
    /// Envelopes to publish, in per-app lanes taken in turns ([`Lanes`]).
    pub outgoing: Arc<Lanes>,
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

/// Publishes batches of up to 256 envelopes, each batch one pipelined round trip. While the
/// broker is down they fail and are dropped (counted); `Commands` reconnects (through the
/// sentinels, so a failover is followed) and a cluster connection follows `MOVED` itself.
fn spawn_publisher(
    commands: Arc<Commands>,
    command: &'static str,
    topic: String,
    out: Arc<Lanes>,
    drops: Arc<Drops>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        let mut failed_batches = 0u64;
        while out.take(&mut batch, 256).await > 0 {
            let mut pipe = redis::pipe();
            let count = batch.len() as u64;
            for payload in batch.drain(..) {
                pipe.cmd(command).arg(&topic).arg(&payload[..]).ignore();
            }
            if let Err(err) = commands.query::<()>(&pipe).await {
                drops.outgoing.fetch_add(count, Ordering::Relaxed);
                failed_batches += 1;
                if failed_batches.is_power_of_two() {
                    tracing::warn!(error = %err, failed_batches, "publishing to Redis failed");
                }
            }
        }
    })
}

/// Connects to Redis in the mode `config` names (one server, Sentinel, or Cluster; see
/// `redis_client`), failing within 5 s with the mode's key when it cannot.
pub async fn redis(config: &RedisConfig) -> Result<Link, SetupError> {
    let target = Redis::from_config(config)?;
    if matches!(target.target, Target::Cluster { .. }) {
        return redis_cluster(target, &config.prefix).await;
    }
    let topic = format!("{}#cluster", config.prefix);
    let commands = Arc::new(Commands::connect(target.clone()).await?);
    // With Sentinel, a moved master is noticed even while the old one still answers.
    let mut moved = crate::redis_client::follow_master(&commands);
    // The subscription gets its master afresh on every attempt: after a Sentinel failover the
    // old master (now a replica) closes our connections, and the new one is asked for.
    let subscribe = |target: Redis, topic: String| async move {
        let mut ps = target.master().await?.get_async_pubsub().await?;
        ps.subscribe(&topic).await?;
        Ok::<_, redis::RedisError>(ps.into_on_message())
    };
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(target.clone(), topic.clone()))
        .await
        .map_err(|_| target.fail(&"timed out"))?
        .map_err(|e| target.fail(&e))?;
    let out_tx = outgoing_lanes();
    let out_rx = out_tx.clone();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (up_tx, up_rx) = watch::channel(true);
    let drops = Arc::new(Drops::default());
    let publisher_task = spawn_publisher(commands, "PUBLISH", topic.clone(), out_rx, drops.clone());

    let sub_drops = drops.clone();
    let subscriber_task = tokio::spawn(async move {
        let shown = target.shown.clone();
        loop {
            let moved_to = loop {
                let master_moved = async {
                    let Some(rx) = moved.as_mut() else { return std::future::pending().await };
                    match rx.changed().await {
                        Ok(()) => rx.borrow_and_update().clone(),
                        // The watcher ended (the link is going away): no more moves.
                        Err(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => forward(&in_tx, &sub_drops, Bytes::copy_from_slice(msg.get_payload_bytes())),
                        None => break None,
                    },
                    addr = master_moved => break Some(addr),
                }
            };
            if let Some(addr) = moved_to {
                // Resubscribe at once on the new master; the link stays up meanwhile.
                if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(target.clone(), topic.clone())).await
                {
                    stream = s;
                    tracing::info!(master = %addr, "Redis subscription moved to the new master");
                    continue;
                }
            }
            up_tx.send_replace(false);
            tracing::warn!(url = %shown, "Redis subscription lost; serving local sockets only while reconnecting");
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(target.clone(), topic.clone())).await
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

/// Redis Cluster: sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis 7), so an envelope goes only
/// to the shard owning the topic's slot (and its replicas) instead of being copied over the
/// cluster bus to every node, as plain `PUBLISH` is. The redis crate's cluster connection does
/// it natively: subscriptions are RESP3 pushes to a sender we give it, it routes both commands
/// by the channel's slot, follows `MOVED`, and resubscribes after a reconnect or a slot change.
async fn redis_cluster(target: Redis, prefix: &str) -> Result<Link, SetupError> {
    // A hash tag would not change anything (one topic is one slot); the name stays as on Redis.
    let topic = format!("{prefix}#cluster");
    let out_tx = outgoing_lanes();
    let out_rx = out_tx.clone();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (up_tx, up_rx) = watch::channel(true);
    let drops = Arc::new(Drops::default());
    let (push_drops, push_up) = (drops.clone(), up_tx.clone());
    // Called on the connection's task for each push: must not block, so the bounded inbox is
    // offered the envelope and a full one drops it (counted), as on the other links.
    let push = move |info: redis::PushInfo| {
        match info.kind {
            redis::PushKind::SMessage => {
                if let Some(redis::Value::BulkString(payload)) = info.data.into_iter().nth(1) {
                    forward(&in_tx, &push_drops, Bytes::from(payload));
                }
            }
            redis::PushKind::Disconnection => {
                push_up.send_replace(false);
            }
            _ => {}
        }
        Ok::<(), std::convert::Infallible>(())
    };
    let client = target.cluster_client(Some(push)).map_err(|e| target.fail(&e))?;
    let connect = async {
        let mut conn = client.get_async_connection().await?;
        conn.ssubscribe(&topic).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| target.fail(&"timed out"))?
        .map_err(|e| target.fail(&e))?;
    let commands = Arc::new(Commands::connect(target.clone()).await?);
    let publisher_task = spawn_publisher(commands, "SPUBLISH", topic.clone(), out_rx, drops.clone());
    // The connection reports a lost node as a push, but not its return: a keyed probe (routed to
    // the topic's master, like the subscription) each second says when the link is whole again.
    let shown = target.shown.clone();
    let health_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut exists = redis::cmd("EXISTS");
            let probe = exists.arg(&topic).query_async::<i64>(&mut conn);
            let ok = matches!(tokio::time::timeout(CONNECT_TIMEOUT, probe).await, Ok(Ok(_)));
            let was = up_tx.send_replace(ok);
            if was && !ok {
                tracing::warn!(url = %shown, "Redis Cluster link lost; serving local sockets only while reconnecting");
            } else if !was && ok {
                tracing::info!(url = %shown, "Redis Cluster link restored");
            }
        }
    });
    Ok(Link { outgoing: out_tx, incoming: in_rx, connected: up_rx, drops, tasks: vec![publisher_task, health_task] })
}

/// Connects to NATS (fails if no server answers within 5 s); async-nats reconnects and
/// resubscribes on its own afterwards.
pub async fn nats(config: &NatsConfig) -> Result<Link, SetupError> {
    let prefix = &config.prefix;
    let (up_tx, up_rx) = watch::channel(false);
    let events = up_tx.clone();
    let client = crate::nats_client::connect(config, move |event| {
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
    })
    .await?;
    let fail = |e: &dyn std::fmt::Display| SetupError {
        key: "adapter.nats.servers",
        message: format!("cannot subscribe on NATS: {e}"),
    };
    up_tx.send_replace(true);
    let subject = format!("{prefix}.cluster");
    let mut subscription = client.subscribe(subject.clone()).await.map_err(|e| fail(&e))?;
    let out_tx = outgoing_lanes();
    let out_rx = out_tx.clone();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let drops = Arc::new(Drops::default());
    let pub_drops = drops.clone();
    let publisher_task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64);
        while out_rx.take(&mut batch, 64).await > 0 {
            for payload in batch.drain(..) {
                if client.publish(subject.clone(), payload).await.is_err() {
                    pub_drops.outgoing.fetch_add(1, Ordering::Relaxed);
                }
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
