//! The webhook queue on Redis: a Stream read through one consumer group by every node.
//!
//! Keys share the hash tag `{<prefix>:webhooks}`, so one Redis Cluster slot holds them all
//! and the scripts below touch them atomically: `:queue` (the stream, one entry per request),
//! `:depth` and `:bytes` (each app's events and bytes in it), `:total` (all events in it) and
//! `:dead` (requests whose retries ran out, at most `dead_letter_max`). Appending checks the
//! bounds and counts in one script, and acknowledging removes the entry and uncounts it in
//! another, so the counts never drift from the stream, whoever crashes when. Nothing blocks a
//! shared connection: a node reads without `BLOCK` and is woken by its own appends, polling
//! every [`super::durable::IDLE_POLL`] otherwise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use super::durable::{Appended, Bounds, Broken, Entry, Taken};
use crate::redis_client::{Commands, Redis};

const GROUP: &str = "sockudo";

/// KEYS: queue, depth, bytes, total. ARGV: app, events, bytes, max app events, max app bytes,
/// max total events, then the entry's fields and values. 1 when stored, 0 over a bound.
const APPEND: &str = r"
local n, b = tonumber(ARGV[2]), tonumber(ARGV[3])
local e = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local eb = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[4]) or '0')
if e + n > tonumber(ARGV[4]) or (e > 0 and eb + b > tonumber(ARGV[5])) or t + n > tonumber(ARGV[6]) then
  return 0
end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HINCRBY', KEYS[2], ARGV[1], n)
redis.call('HINCRBY', KEYS[3], ARGV[1], b)
redis.call('INCRBY', KEYS[4], n)
return 1
";

/// KEYS: queue, depth, bytes, total, dead. ARGV: group, entry id, app, events, bytes, `1` to
/// keep a dead letter, its bound, then its fields and values. Only the first acknowledgement
/// of an entry counts (two nodes may both finish a claimed one).
const ACK: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local function down(key, field, by)
  if redis.call('HINCRBY', key, field, -by) <= 0 then redis.call('HDEL', key, field) end
end
down(KEYS[2], ARGV[3], tonumber(ARGV[4]))
down(KEYS[3], ARGV[3], tonumber(ARGV[5]))
if redis.call('DECRBY', KEYS[4], tonumber(ARGV[4])) < 0 then redis.call('SET', KEYS[4], 0) end
if ARGV[6] == '1' then
  local fields = {}
  for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[5], 'MAXLEN', ARGV[7], '*', unpack(fields))
end
return 1
";

pub(crate) struct RedisQueue {
    commands: Arc<Commands>,
    /// `queue`, `depth`, `bytes`, `total`, `dead`.
    keys: [String; 5],
    consumer: String,
    claim_idle_ms: u64,
    /// Where the next `XAUTOCLAIM` scan starts.
    cursor: std::sync::Mutex<String>,
}

/// Whether Redis answered with the error `code` (in a pipeline the code is inside the
/// pipeline's error, not its own).
fn says(e: &redis::RedisError, code: &str) -> bool {
    e.code() == Some(code) || e.to_string().contains(code)
}

fn broken(e: redis::RedisError) -> Broken {
    Broken(e.to_string())
}

impl RedisQueue {
    pub async fn connect(redis: Redis, prefix: &str, node: &str, claim_idle: Duration) -> Result<Self, Broken> {
        let commands = Arc::new(Commands::connect(redis).await.map_err(|e| Broken(e.to_string()))?);
        let tag = format!("{{{prefix}:webhooks}}");
        let keys = ["queue", "depth", "bytes", "total", "dead"].map(|k| format!("{tag}:{k}"));
        let queue = Self {
            commands,
            keys,
            consumer: node.to_owned(),
            claim_idle_ms: claim_idle.as_millis() as u64,
            cursor: std::sync::Mutex::new("0-0".into()),
        };
        queue.create_group().await?;
        Ok(queue)
    }

    /// The consumer group, made if missing (a new Redis, or one that lost its data).
    async fn create_group(&self) -> Result<(), Broken> {
        let mut pipe = redis::pipe();
        pipe.cmd("XGROUP").arg("CREATE").arg(&self.keys[0]).arg(GROUP).arg("0").arg("MKSTREAM");
        match self.commands.query::<()>(&pipe).await {
            Err(e) if !says(&e, "BUSYGROUP") => Err(broken(e)),
            _ => Ok(()),
        }
    }

    fn fields(entry: &Entry) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            ("id", entry.id.as_bytes().to_vec()),
            ("app", entry.app.as_bytes().to_vec()),
            ("t", entry.target.to_string().into_bytes()),
            ("fp", entry.fingerprint.as_bytes().to_vec()),
            ("n", entry.events.to_string().into_bytes()),
            ("b", entry.bytes.to_string().into_bytes()),
            ("body", entry.body.to_vec()),
        ];
        if let Some(tp) = &entry.traceparent {
            f.push(("tp", tp.as_bytes().to_vec()));
        }
        if let Some(bg) = &entry.baggage {
            f.push(("bg", bg.as_bytes().to_vec()));
        }
        f
    }

    fn parse(s: &StreamId) -> Option<Entry> {
        Some(Entry {
            id: Arc::from(s.get::<String>("id")?),
            app: s.get("app")?,
            target: s.get::<String>("t")?.parse().ok()?,
            fingerprint: s.get("fp")?,
            events: s.get::<String>("n")?.parse().ok()?,
            bytes: s.get::<String>("b")?.parse().ok()?,
            traceparent: s.get::<String>("tp").map(Arc::from),
            baggage: s.get::<String>("bg").map(Arc::from),
            body: Bytes::from(s.get::<Vec<u8>>("body")?),
        })
    }

    fn append_cmd(&self, pipe: &mut redis::Pipeline, entry: &Entry, bounds: &Bounds) {
        let cmd = pipe.cmd("EVAL").arg(APPEND).arg(4).arg(&self.keys[..4]);
        cmd.arg(&entry.app).arg(entry.events).arg(entry.bytes);
        cmd.arg(bounds.app_events).arg(bounds.app_bytes).arg(bounds.total_events);
        for (k, v) in Self::fields(entry) {
            cmd.arg(k).arg(v);
        }
    }

    pub async fn append(&self, entries: &[&Entry], bounds: &Bounds) -> Result<Vec<Appended>, Broken> {
        let mut pipe = redis::pipe();
        for e in entries {
            self.append_cmd(&mut pipe, e, bounds);
        }
        let stored: Vec<i64> = self.commands.query(&pipe).await.map_err(broken)?;
        Ok(stored.into_iter().map(|s| if s == 1 { Appended::Stored } else { Appended::Full }).collect())
    }

    /// Up to `max` entries: new ones, or (with `claim`) ones idle for `claim_idle_ms` whoever
    /// took them.
    pub async fn take(&self, max: usize, claim: bool) -> Result<Vec<Taken>, Broken> {
        let ids = match if claim { self.claim(max).await } else { self.read(max).await } {
            Ok(ids) => ids,
            // The group is gone (a Redis that restarted empty, or was flushed): make it again;
            // whatever is in the stream now is read from its start.
            Err(e) if says(&e, "NOGROUP") => {
                self.create_group().await?;
                Vec::new()
            }
            Err(e) => return Err(broken(e)),
        };
        let mut taken = Vec::with_capacity(ids.len());
        for s in ids {
            match Self::parse(&s) {
                Some(entry) => taken.push(Taken { entry, receipt: super::durable::Receipt::Redis(s.id) }),
                None => {
                    // Not ours (written by hand, or by an incompatible version): keep it out of
                    // the way without losing it.
                    tracing::warn!(entry = %s.id, "malformed webhook queue entry moved to the dead letters");
                    self.finish_raw(&s.id, &s.map).await?;
                }
            }
        }
        Ok(taken)
    }

    async fn read(&self, max: usize) -> redis::RedisResult<Vec<StreamId>> {
        let mut pipe = redis::pipe();
        pipe.cmd("XREADGROUP").arg("GROUP").arg(GROUP).arg(&self.consumer).arg("COUNT").arg(max);
        pipe.arg("STREAMS").arg(&self.keys[0]).arg(">");
        let (reply,): (Option<StreamReadReply>,) = self.commands.query(&pipe).await?;
        Ok(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect())
    }

    async fn claim(&self, max: usize) -> redis::RedisResult<Vec<StreamId>> {
        let start = self.cursor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XAUTOCLAIM").arg(&self.keys[0]).arg(GROUP).arg(&self.consumer).arg(self.claim_idle_ms);
        pipe.arg(start).arg("COUNT").arg(max);
        let (reply,): (StreamAutoClaimReply,) = self.commands.query(&pipe).await?;
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = reply.next_stream_id;
        Ok(reply.claimed)
    }

    /// Resets the entry's idle time, so that no other node claims it while this one works.
    pub async fn keep(&self, id: &str) -> Result<(), Broken> {
        let mut pipe = redis::pipe();
        pipe.cmd("XCLAIM").arg(&self.keys[0]).arg(GROUP).arg(&self.consumer).arg(0).arg(id).arg("JUSTID");
        self.commands.query::<()>(&pipe).await.map_err(broken)
    }

    /// Acknowledges and removes the entry; with `dead`, keeps a copy in the dead letters.
    pub async fn finish(&self, id: &str, entry: &Entry, dead: Option<usize>) -> Result<(), Broken> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("EVAL").arg(ACK).arg(5).arg(&self.keys[..]);
        cmd.arg(GROUP).arg(id).arg(&entry.app).arg(entry.events).arg(entry.bytes);
        cmd.arg(if dead.is_some() { "1" } else { "0" }).arg(dead.unwrap_or(0).max(1));
        if dead.is_some() {
            for (k, v) in Self::fields(entry) {
                cmd.arg(k).arg(v);
            }
        }
        self.commands.query::<()>(&pipe).await.map_err(broken)
    }

    /// A malformed entry: acknowledged, copied as it is to the dead letters.
    async fn finish_raw(&self, id: &str, map: &HashMap<String, redis::Value>) -> Result<(), Broken> {
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&self.keys[0]).arg(GROUP).arg(id).ignore();
        pipe.cmd("XDEL").arg(&self.keys[0]).arg(id).ignore();
        if !map.is_empty() {
            let cmd = pipe.cmd("XADD").arg(&self.keys[4]).arg("*");
            for (k, v) in map {
                cmd.arg(k).arg(redis::from_redis_value_ref::<Vec<u8>>(v).unwrap_or_default());
            }
            cmd.ignore();
        }
        self.commands.query::<()>(&pipe).await.map_err(broken)
    }

    /// Each app's events in the queue.
    pub async fn depth(&self) -> Result<Vec<(String, i64)>, Broken> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&self.keys[1]);
        let (map,): (HashMap<String, i64>,) = self.commands.query(&pipe).await.map_err(broken)?;
        Ok(map.into_iter().collect())
    }

    /// Moves dead letters (of `app` only, when given) back into the queue, oldest first, until
    /// none is left or the queue is full; returns how many moved.
    pub async fn replay(&self, app: Option<&str>, bounds: &Bounds) -> Result<usize, Broken> {
        let (mut moved, mut start) = (0, "-".to_owned());
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE").arg(&self.keys[4]).arg(&start).arg("+").arg("COUNT").arg(100);
            let (page,): (redis::streams::StreamRangeReply,) = self.commands.query(&pipe).await.map_err(broken)?;
            if page.ids.is_empty() {
                return Ok(moved);
            }
            for s in &page.ids {
                start = format!("({}", s.id);
                let Some(entry) = Self::parse(s) else { continue };
                if app.is_some_and(|a| a != entry.app) {
                    continue;
                }
                let mut pipe = redis::pipe();
                self.append_cmd(&mut pipe, &entry, bounds);
                let (stored,): (i64,) = self.commands.query(&pipe).await.map_err(broken)?;
                if stored != 1 {
                    return Ok(moved);
                }
                let mut pipe = redis::pipe();
                pipe.cmd("XDEL").arg(&self.keys[4]).arg(&s.id);
                self.commands.query::<()>(&pipe).await.map_err(broken)?;
                moved += 1;
            }
        }
    }
}
