//! Connections: open N idle subscribed connections (bounded concurrency, source addresses
//! cycling over 127.0.0.1..=127.0.0.K so that more than one address's ephemeral ports can be
//! used), report the connect rate and the server's resident memory per connection (VmRSS
//! before and after, given `--server-pid`), hold them, then close them all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::pusher::{self, Frame, Target};
use crate::report::{self, progress, Latency};
use crate::sys;

#[derive(Debug, Clone, Serialize)]
pub struct ConnParams {
    pub connections: usize,
    /// Connections are spread over this many channels (one subscription each).
    pub channels: usize,
    pub concurrency: usize,
    pub source_addrs: usize,
    pub settle_seconds: f64,
    pub hold_seconds: f64,
}

/// The `connections` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: ConnParams,
    pub nofile_limit: u64,
    pub opened: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    pub open_seconds: f64,
    pub connects_per_second: f64,
    /// TCP connect to `subscription_succeeded`, per connection.
    pub connect_latency: Latency,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    pub rss_per_connection_kb: Option<f64>,
    pub rss_after_close_kb: Option<u64>,
    /// Connections that the server ended while they were held.
    pub dropped_during_hold: u64,
    pub close_seconds: f64,
    /// CPU use while the connections were being opened.
    pub cpu_opening: sys::CpuUse,
}

impl ConnectionsReport {
    pub fn print(&self) {
        let mut t = report::Table::new(
            format!(
                "connections: {} idle subscribed connections on {} channel(s) against {}, {} source address(es)",
                self.params.connections,
                self.params.channels,
                self.server,
                self.params.source_addrs.max(1)
            ),
            &["figure", "value"],
        );
        t.kv("opened / failed", format!("{} / {} {:?}", self.opened, self.failed, self.failures));
        t.kv("open time s", format!("{:.2}", self.open_seconds));
        t.kv("connects/s", format!("{:.0}", self.connects_per_second));
        t.kv(
            "connect-to-subscribed p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2}",
                self.connect_latency.p50_ms, self.connect_latency.p99_ms, self.connect_latency.max_ms
            ),
        );
        let kb = |v: Option<u64>| v.map(|x| format!("{x} KB")).unwrap_or_else(|| "n/a".to_owned());
        t.kv("server RSS before", kb(self.rss_before_kb));
        t.kv("server RSS with all open", kb(self.rss_after_kb));
        t.kv(
            "server RSS per connection",
            self.rss_per_connection_kb.map(|v| format!("{v:.2} KB")).unwrap_or_else(|| "n/a".into()),
        );
        t.kv("server RSS after close", kb(self.rss_after_close_kb));
        t.kv(
            "CPU s while opening: server / bench / other",
            format!(
                "{} / {} / {}",
                report::opt(self.cpu_opening.server_cpu_seconds, 2),
                report::opt(self.cpu_opening.bench_cpu_seconds, 2),
                report::opt(self.cpu_opening.other_cpu_seconds, 2)
            ),
        );
        t.kv("dropped while held", self.dropped_during_hold);
        t.kv("close time s", format!("{:.2}", self.close_seconds));
        if let Some(f) = &self.first_failure {
            t.kv("first failure", f);
        }
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let params = format!(
            "{} idle subscribed connections on {} channel(s), {} at a time",
            self.params.connections, self.params.channels, self.params.concurrency
        );
        let result = format!(
            "{} opened, {} failed; {:.0} connects/s (p99 {:.2} ms); server RSS {} KB per connection ({} -> {} KB, {} KB after close); {} dropped while held; other load {} CPU s while opening",
            self.opened,
            self.failed,
            self.connects_per_second,
            self.connect_latency.p99_ms,
            report::opt(self.rss_per_connection_kb, 2),
            self.rss_before_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            self.rss_after_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            self.rss_after_close_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            self.dropped_during_hold,
            report::opt(self.cpu_opening.other_cpu_seconds, 1)
        );
        (params, result)
    }
}

/// Runs the `connections` scenario.
pub async fn run(
    target: &Target,
    params: ConnParams,
    server_pid: Option<u32>,
    nofile_limit: u64,
) -> Result<ConnectionsReport, String> {
    let pid = server_pid.map(|p| p.to_string());
    let rss = || pid.as_deref().and_then(sys::rss_kb);
    if params.connections as u64 + 64 > nofile_limit {
        progress(&format!(
            "[connections] warning: the open-file limit is {nofile_limit}; connections past it will fail (raise `ulimit -n`)"
        ));
    }
    let run_id = format!("{}-{}", std::process::id(), sys::now_nanos() % 1_000_000);
    let channels = params.channels.max(1);
    let rss_before = rss();
    let cpu = sys::CpuMeter::start(server_pid);

    let limit = Arc::new(Semaphore::new(params.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Result<Duration, pusher::Failure>>();
    let dropped = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..params.connections {
        let (target, limit, res_tx, dropped) = (target.clone(), limit.clone(), res_tx.clone(), dropped.clone());
        let mut stop_rx = stop_rx.clone();
        let channel = format!("conn-{run_id}-{}", i % channels);
        let source = target.source_for(i, params.source_addrs);
        tasks.spawn(async move {
            let opened = async {
                let _permit = limit.acquire_owned().await;
                let t0 = Instant::now();
                let mut ws = pusher::open(&target, source, pusher::ws_config(false)).await?;
                pusher::subscribe(&mut ws, &channel, target.timeout).await?;
                Ok::<_, pusher::Failure>((ws, t0.elapsed()))
            }
            .await;
            let mut ws = match opened {
                Ok((ws, took)) => {
                    let _ = res_tx.send(Ok(took));
                    ws
                }
                Err(f) => {
                    let _ = res_tx.send(Err(f));
                    return;
                }
            };
            // Hold: answer pings until told to stop, then close.
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => {
                        let _ = pusher::close(ws, Duration::from_secs(5)).await;
                        return;
                    }
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => {
                            let ping = Frame::parse(t.as_str()).is_some_and(|f| f.event == "pusher:ping");
                            if ping && ws.send(pusher::pong()).await.is_err() {
                                dropped.fetch_add(1, Relaxed);
                                return;
                            }
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            dropped.fetch_add(1, Relaxed);
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                }
            }
        });
    }
    drop(res_tx);

    let mut hist = report::histogram();
    let (mut opened, mut failed) = (0usize, 0usize);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0usize;
    while opened + failed < params.connections {
        tokio::select! {
            r = res_rx.recv() => match r {
                Some(Ok(took)) => {
                    opened += 1;
                    report::record(&mut hist, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                }
                Some(Err(f)) => {
                    failed += 1;
                    *failures.entry(f.stage.name().to_owned()).or_default() += 1;
                    first_failure.get_or_insert_with(|| f.to_string());
                }
                None => break,
            },
            _ = tick.tick() => {
                progress(&format!(
                    "[connections] {:>4.0}s open={opened}/{} (+{}/s) failed={failed} server_rss={}",
                    started.elapsed().as_secs_f64(),
                    params.connections,
                    opened - last.min(opened),
                    rss().map(|kb| format!("{kb}KB")).unwrap_or_else(|| "n/a".into()),
                ));
                last = opened;
            }
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let cpu_opening = cpu.stop();
    progress(&format!("[connections] {opened} open, {failed} failed in {open_seconds:.2}s; settling"));

    tokio::time::sleep(sys::secs(params.settle_seconds)).await;
    let rss_after = rss();
    let hold_left = params.hold_seconds - params.settle_seconds;
    if hold_left > 0.0 {
        progress(&format!("[connections] holding for {hold_left:.0}s more"));
        tokio::time::sleep(sys::secs(hold_left)).await;
    }
    let dropped_during_hold = dropped.load(Relaxed);

    let closing = Instant::now();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(60), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    let close_seconds = closing.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_close = rss();

    let rss_per_connection_kb = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) / opened as f64),
        _ => None,
    };
    Ok(ConnectionsReport {
        scenario: "connections",
        server: format!("{}:{}", target.host, target.port),
        params,
        nofile_limit,
        opened,
        failed,
        failures,
        first_failure,
        open_seconds,
        connects_per_second: opened as f64 / open_seconds.max(1e-9),
        connect_latency: Latency::of(&hist),
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        rss_per_connection_kb,
        rss_after_close_kb: rss_after_close,
        dropped_during_hold,
        close_seconds,
        cpu_opening,
    })
}
