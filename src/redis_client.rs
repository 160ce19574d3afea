//! Redis connections built once from `adapter.redis`, for every Redis user (the broker link in
//! `adapter/transport.rs` and the shared rate limiter), so TLS, ACL credentials, Sentinel and
//! Cluster work the same everywhere.
//!
//! The mode follows from the config, most specific first: `cluster_nodes` not empty → Redis
//! Cluster; else `sentinels` not empty → the master that the sentinels name (`master_name`),
//! reached with the scheme, credentials and database of `url`; else the one server at `url`.
//! `rediss://` URLs use rustls with the system's roots, or only the CA in `ca_path`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisResult, TlsCertificates,
};

use crate::config::{mask_url_password, RedisConfig};

/// How long a connection (and, with Sentinel, the master's lookup) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A Redis setting that cannot work, with the config key to name (exit 64 at startup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SetupError {
    pub key: &'static str,
    pub message: String,
}

impl SetupError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self { key, message: message.into() }
    }
}

/// Where Redis is, resolved from the config without any I/O beyond reading `ca_path`.
#[derive(Clone)]
pub enum Target {
    Single(Client),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        master: ConnectionInfo,
        certs: Option<TlsCertificates>,
    },
    Cluster {
        nodes: Vec<ConnectionInfo>,
        certs: Option<TlsCertificates>,
    },
}

/// Where the Redis link goes and how it is shown: the mode's config key and its URLs with
/// passwords masked.
#[derive(Clone)]
pub struct Redis {
    pub target: Target,
    pub key: &'static str,
    pub shown: String,
}

fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

impl Redis {
    /// The target of `c` (see the module doc for how the mode is chosen).
    pub fn from_config(c: &RedisConfig) -> Result<Self, SetupError> {
        let (key, urls): (&'static str, &[String]) = if !c.cluster_nodes.is_empty() {
            ("adapter.redis.cluster_nodes", &c.cluster_nodes)
        } else if !c.sentinels.is_empty() {
            ("adapter.redis.sentinels", &c.sentinels)
        } else {
            ("adapter.redis.url", std::slice::from_ref(&c.url))
        };
        let shown = urls.iter().map(|u| mask_url_password(u)).collect::<Vec<_>>().join(",");
        let parse = |key: &'static str, url: &str| {
            url.into_connection_info()
                .map_err(|e| SetupError::new(key, format!("{} is not a Redis URL: {e}", mask_url_password(url))))
        };
        let infos = urls.iter().map(|u| parse(key, u)).collect::<Result<Vec<_>, _>>()?;
        // The URLs that meet the servers' certificates: the seeds, or the master's template.
        let tls = if key == "adapter.redis.sentinels" {
            is_tls(&parse("adapter.redis.url", &c.url)?)
        } else {
            infos.iter().any(is_tls)
        };
        let certs = match c.ca_path.as_str() {
            "" => None,
            _ if !tls => {
                return Err(SetupError::new("adapter.redis.ca_path", "is set but no Redis URL is rediss:// (TLS)"))
            }
            path => {
                let pem = std::fs::read(path)
                    .map_err(|e| SetupError::new("adapter.redis.ca_path", format!("cannot read {path}: {e}")))?;
                Some(TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
        };
        let target = if key == "adapter.redis.cluster_nodes" {
            Target::Cluster { nodes: infos, certs }
        } else if key == "adapter.redis.sentinels" {
            let master = parse("adapter.redis.url", &c.url)?;
            Target::Sentinel { sentinels: infos, master_name: c.master_name.clone(), master, certs }
        } else {
            let info = infos.into_iter().next().ok_or_else(|| SetupError::new(key, "is empty"))?;
            let client = match certs {
                None => Client::open(info),
                Some(certs) => Client::build_with_tls(info, certs),
            }
            // A CA file that is not PEM fails here, before any connection.
            .map_err(|e| {
                SetupError::new(if c.ca_path.is_empty() { key } else { "adapter.redis.ca_path" }, e.to_string())
            })?;
            Target::Single(client)
        };
        Ok(Self { target, key, shown })
    }

    /// A startup failure of this target, naming its key.
    pub fn fail(&self, e: &dyn std::fmt::Display) -> SetupError {
        SetupError::new(self.key, format!("cannot connect to Redis at {}: {e}", self.shown))
    }

    /// The client of the one server, or of the master the sentinels name now (asked afresh
    /// each time, so a failover is followed).
    pub async fn master(&self) -> RedisResult<Client> {
        match &self.target {
            Target::Single(client) => Ok(client.clone()),
            Target::Sentinel { sentinels, master_name, master, certs } => {
                let addrs = sentinels.iter().map(|s| s.addr().clone());
                let mut b = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?;
                // The sentinels' own credentials (the same for every sentinel).
                if let Some(s) = sentinels.first() {
                    if let Some(user) = s.redis_settings().username() {
                        b = b.set_client_to_sentinel_username(user);
                    }
                    if let Some(pass) = s.redis_settings().password() {
                        b = b.set_client_to_sentinel_password(pass);
                    }
                }
                if let Some(user) = master.redis_settings().username() {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(pass) = master.redis_settings().password() {
                    b = b.set_client_to_redis_password(pass);
                }
                b = b.set_client_to_redis_db(master.redis_settings().db());
                if is_tls(master) {
                    b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                }
                if let Some(certs) = certs {
                    b = b.set_client_to_redis_certificates(certs.clone());
                }
                // A fresh client per lookup: no lock is shared across the lookup's awaits.
                b.build()?.async_get_client().await
            }
            Target::Cluster { .. } => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster has no single master; use the cluster connection",
            ))),
        }
    }

    /// A Redis Cluster client speaking RESP3 (sharded pub/sub arrives as push messages, sent
    /// to `push`).
    pub fn cluster_client(&self, push: Option<impl redis::aio::AsyncPushSender>) -> RedisResult<ClusterClient> {
        let Target::Cluster { nodes, certs } = &self.target else {
            return Err(redis::RedisError::from((redis::ErrorKind::Client, "not a Redis Cluster")));
        };
        let mut b = ClusterClientBuilder::new(nodes.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(CONNECT_TIMEOUT);
        if let Some(certs) = certs {
            b = b.certs(certs.clone());
        }
        if let Some(push) = push {
            b = b.push_sender(push);
        }
        b.build()
    }
}

#[derive(Clone)]
enum Conn {
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

struct State {
    conn: Option<Conn>,
    /// The plain connection's server (`host:port`), to notice that the master moved.
    addr: Option<String>,
    next_attempt: Instant,
    backoff: Duration,
}

/// A command connection that follows its target: a plain one is dropped on a connection error
/// and opened again (through the sentinels, so a failover is followed) at most once per backoff
/// step; calls in between fail at once rather than wait, so a Redis outage costs callers no
/// latency. A cluster connection reconnects and follows `MOVED` on its own.
pub struct Commands {
    redis: Redis,
    state: Mutex<State>,
}

async fn open(redis: &Redis) -> RedisResult<(Conn, Option<String>)> {
    let open = async {
        match &redis.target {
            Target::Cluster { .. } => {
                let client = redis.cluster_client(None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>)?;
                Ok((Conn::Cluster(client.get_async_connection().await?), None))
            }
            _ => {
                let client = redis.master().await?;
                let addr = client.get_connection_info().addr().to_string();
                Ok((Conn::Plain(client.get_multiplexed_async_connection().await?), Some(addr)))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out connecting")))?
}

impl Commands {
    /// Connects now: an unreachable Redis at startup is an error naming the key.
    pub async fn connect(redis: Redis) -> Result<Self, SetupError> {
        let (conn, addr) = open(&redis).await.map_err(|e| redis.fail(&e))?;
        let state = State { conn: Some(conn), addr, next_attempt: Instant::now(), backoff: Duration::from_millis(100) };
        Ok(Self { redis, state: Mutex::new(state) })
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection now, opening one if it is time to try again.
    async fn conn(&self) -> RedisResult<Conn> {
        {
            let mut s = self.lock();
            if let Some(c) = &s.conn {
                return Ok(c.clone());
            }
            let now = Instant::now();
            if now < s.next_attempt {
                return Err(redis::RedisError::from((redis::ErrorKind::Io, "reconnecting to Redis")));
            }
            // This caller tries; the others fail fast until the next step.
            s.next_attempt = now + s.backoff;
            s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        }
        let (conn, addr) = open(&self.redis).await?;
        let mut s = self.lock();
        s.conn = Some(conn.clone());
        s.addr = addr;
        s.backoff = Duration::from_millis(100);
        Ok(conn)
    }

    /// Runs `pipe` (all its keys in one slot, for a cluster).
    pub async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> RedisResult<T> {
        let result = match self.conn().await? {
            Conn::Plain(mut c) => pipe.query_async(&mut c).await,
            Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
        };
        if let Err(e) = &result {
            // A read-only answer means the master became a replica (a failover): look again.
            let lost = e.is_io_error()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
            let mut s = self.lock();
            if lost && matches!(s.conn, Some(Conn::Plain(_))) {
                s.conn = None;
            }
        }
        result
    }
}

/// Sentinel only: asks the sentinels for the master each second and, when it moved, drops the
/// command connection of `commands` (its next call opens one to the new master) and announces
/// the new address on the returned channel (the subscriber resubscribes there).
///
/// Needed because a forced failover (`SENTINEL FAILOVER`) leaves the old master a master, and
/// our connections to it alive, until the sentinel gets round to demoting it: meanwhile nodes
/// that reconnected elsewhere would not hear the ones still on it. The task ends with
/// `commands`.
pub fn follow_master(commands: &std::sync::Arc<Commands>) -> Option<tokio::sync::watch::Receiver<String>> {
    if !matches!(commands.redis.target, Target::Sentinel { .. }) {
        return None;
    }
    let first = commands.lock().addr.clone().unwrap_or_default();
    let (moved_tx, moved_rx) = tokio::sync::watch::channel(first);
    let weak = std::sync::Arc::downgrade(commands);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(commands) = weak.upgrade() else { return };
            let lookup = tokio::time::timeout(CONNECT_TIMEOUT, commands.redis.master()).await;
            let Ok(Ok(client)) = lookup else { continue };
            let addr = client.get_connection_info().addr().to_string();
            if *moved_tx.borrow() != addr {
                tracing::info!(master = %addr, "the sentinels name a new Redis master; moving to it");
                {
                    let mut s = commands.lock();
                    if s.addr.as_deref() != Some(addr.as_str()) {
                        s.conn = None;
                        s.next_attempt = Instant::now();
                    }
                }
                moved_tx.send_replace(addr);
            }
        }
    });
    Some(moved_rx)
}
